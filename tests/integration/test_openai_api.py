"""`swarm api`: a real API process over the tiny swarm, driven by the official `openai` package, checked
token for token against local transformers on the same weights and chat template."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from transformers import AutoTokenizer, LogitsProcessorList

from swarm.api.sampling import OpenAIPenalties
from swarm.client import DistributedModelForCausalLM
from swarm.client.remote import get_info
from swarm.models.tiny import write_tiny_llama, write_tiny_tokenizer

KEY = "test-key"
TIMEOUT = 120.0  # seconds for one call: generation on 2 loaded cores is slow, never this slow
EOS = 2
MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is a swarm?"},
]


@pytest.fixture(scope="module")
def model_folder(tiny_model, tmp_path_factory):
    """The tiny Llama the swarm serves (same name, same weights) with a tokenizer and chat template."""
    folder = tmp_path_factory.mktemp("api") / tiny_model.name
    shutil.copytree(tiny_model, folder)
    write_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(model_folder):
    return AutoTokenizer.from_pretrained(model_folder)


@pytest.fixture(scope="module")
def api(model_folder, tiny_swarm):
    process = tiny_swarm.start_api([str(model_folder)], "--max-tokens", "300", "--api-key", KEY)
    try:
        yield process
    finally:
        process.terminate()


@pytest.fixture(scope="module")
def client(api):
    with openai.OpenAI(base_url=api.address, api_key=KEY, max_retries=0, timeout=TIMEOUT) as client:
        yield client


def chat_ids(tokenizer, messages=MESSAGES) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def local_tokens(local_model, ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """What local transformers generates after `ids` (greedy unless told), up to and including EOS."""
    with torch.no_grad():
        out = local_model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs
        )
    new = out[0, len(ids) :].tolist()
    return new[: new.index(EOS) + 1] if EOS in new else new


def test_models_lists_the_served_model_with_its_coverage(client, tiny_model):
    models = client.models.list().data
    assert [m.id for m in models] == [tiny_model.name]
    assert models[0].swarm["num_blocks"] == 6 and models[0].swarm["missing_blocks"] == []
    assert client.models.retrieve(tiny_model.name).id == tiny_model.name
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.models.retrieve("no-such-model")


def test_greedy_chat_equals_local_transformers_streamed_or_not(client, tokenizer, local_model, tiny_model):
    ids = chat_ids(tokenizer)
    expected = local_tokens(local_model, ids, 24)
    text = tokenizer.decode(expected, skip_special_tokens=True)
    reply = client.chat.completions.create(
        model=tiny_model.name, messages=MESSAGES, temperature=0, max_tokens=24
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == ("stop" if expected[-1] == EOS else "length")
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == len(expected)
    assert reply.usage.total_tokens == len(ids) + len(expected)

    stream = client.chat.completions.create(
        model=tiny_model.name,
        messages=MESSAGES,
        temperature=0,
        max_completion_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected)
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_cuts_where_transformers_stop_strings_would(client, tokenizer, local_model, tiny_model):
    ids = chat_ids(tokenizer)
    free = tokenizer.decode(local_tokens(local_model, ids, 40), skip_special_tokens=True)
    # two printable characters from the middle of what greedy decoding says
    start = next(i for i in range(len(free) // 3, len(free) - 2) if free[i : i + 2].isprintable())
    stop = free[start : start + 2]
    stopped = local_tokens(local_model, ids, 40, stop_strings=[stop], tokenizer=tokenizer)
    expected = tokenizer.decode(stopped, skip_special_tokens=True)
    expected = expected[: expected.index(stop)]
    for stream in (False, True):
        kwargs = dict(
            model=tiny_model.name, messages=MESSAGES, temperature=0, max_tokens=40, stop=[stop, "@@"]
        )
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        else:
            choice = client.chat.completions.create(**kwargs).choices[0]
            text, finish = choice.message.content, [choice.finish_reason]
        assert text == expected and stop not in text
        assert finish == ["stop"]


def test_the_same_seed_samples_the_same_text(client, tiny_model):
    kwargs = dict(model=tiny_model.name, messages=MESSAGES, temperature=1.0, top_p=0.95, max_tokens=16)
    first = client.chat.completions.create(seed=7, **kwargs).choices[0].message.content
    assert client.chat.completions.create(seed=7, **kwargs).choices[0].message.content == first
    others = [client.chat.completions.create(seed=s, **kwargs).choices[0].message.content for s in (8, 9, 10)]
    assert any(other != first for other in others)


def test_n_choices_are_sampled_apart_and_greedy_ones_agree(client, tiny_model):
    kwargs = dict(model=tiny_model.name, messages=MESSAGES, max_tokens=12, n=3)
    greedy = client.chat.completions.create(temperature=0, **kwargs)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1
    sampled = client.chat.completions.create(temperature=1.5, seed=3, logprobs=True, **kwargs)
    assert len({c.message.content for c in sampled.choices}) > 1
    assert sampled.usage.completion_tokens == sum(len(c.logprobs.content) for c in sampled.choices)


def test_penalties_are_openais(client, tokenizer, local_model, tiny_model):
    ids = chat_ids(tokenizer)
    penalties = LogitsProcessorList([OpenAIPenalties(len(ids), 1.2, 0.6)])
    expected = local_tokens(local_model, ids, 30, logits_processor=penalties)
    reply = client.chat.completions.create(
        model=tiny_model.name,
        messages=MESSAGES,
        temperature=0,
        max_tokens=30,
        frequency_penalty=1.2,
        presence_penalty=0.6,
    )
    assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    plain = client.chat.completions.create(
        model=tiny_model.name, messages=MESSAGES, temperature=0, max_tokens=30
    )
    assert plain.choices[0].message.content != reply.choices[0].message.content


def test_chat_logprobs_are_the_models(client, tokenizer, local_model, tiny_model):
    ids = chat_ids(tokenizer)
    reply = client.chat.completions.create(
        model=tiny_model.name, messages=MESSAGES, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    entries = reply.choices[0].logprobs.content
    tokens = local_tokens(local_model, ids, 8)
    assert len(entries) == len(tokens) == reply.usage.completion_tokens
    with torch.no_grad():
        logits = local_model(torch.tensor([ids + tokens])).logits[0].float()
    expected = torch.log_softmax(logits, -1)
    for position, (entry, token) in enumerate(zip(entries, tokens, strict=True)):
        row = expected[len(ids) - 1 + position]
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-3)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(float(row.max()), abs=1e-3)
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)  # greedy took the best
        assert bytes(entry.bytes).decode() == entry.token


def test_text_completions_with_echo_and_logprobs(client, tokenizer, local_model, tiny_model):
    prompt = "The swarm is"
    ids = tokenizer(prompt)["input_ids"]
    tokens = local_tokens(local_model, ids, 10)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    reply = client.completions.create(model=tiny_model.name, prompt=prompt, temperature=0, max_tokens=10)
    assert reply.choices[0].text == text and reply.usage.prompt_tokens == len(ids)
    echoed = client.completions.create(
        model=tiny_model.name, prompt=prompt, temperature=0, max_tokens=10, echo=True, logprobs=2
    )
    choice = echoed.choices[0]
    assert choice.text == prompt + text
    assert len(choice.logprobs.tokens) == len(ids) + len(tokens)
    assert choice.logprobs.token_logprobs[0] is None  # nothing comes before the first prompt token
    for position in range(1, len(choice.logprobs.tokens)):
        # two tokens each (tokens that decode alike, such as stray bytes, share one key)
        top, chosen = choice.logprobs.top_logprobs[position], choice.logprobs.token_logprobs[position]
        assert 1 <= len(top) <= 2 and max(top.values()) >= chosen - 1e-5
    # the generated tokens are greedy's: each is the most likely
    assert all(
        max(top.values()) == pytest.approx(chosen, abs=1e-5)
        for top, chosen in zip(
            choice.logprobs.top_logprobs[len(ids) :], choice.logprobs.token_logprobs[len(ids) :], strict=True
        )
    )
    streamed = client.completions.create(
        model=tiny_model.name, prompt=ids, temperature=0, max_tokens=10, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text


def test_eight_concurrent_streams_all_equal_local(client, tokenizer, local_model, tiny_model):
    questions = [f"Question {i}: what is {i} + {i}?" for i in range(8)]

    def ask(question: str) -> str:
        stream = client.chat.completions.create(
            model=tiny_model.name,
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=12,
            stream=True,
        )
        return "".join(c.choices[0].delta.content or "" for c in stream)

    with ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(ask, questions))
    for question, answer in zip(questions, answers, strict=True):
        ids = chat_ids(tokenizer, [{"role": "user", "content": question}])
        assert answer == tokenizer.decode(local_tokens(local_model, ids, 12), skip_special_tokens=True)


def test_a_client_that_disconnects_frees_its_session(client, tiny_model, tiny_swarm, tiny_nodes):
    with DistributedModelForCausalLM.from_pretrained(tiny_model, tiny_swarm.initial_peers) as observer:

        def tokens_left() -> list[int]:
            return [
                observer.run_async(get_info(observer.p2p, node.peer_id, 10)).server.cache_tokens_left
                for node in tiny_nodes
            ]

        idle = tokens_left()
        stream = client.chat.completions.create(
            model=tiny_model.name,
            messages=MESSAGES,
            temperature=0,
            max_tokens=300,
            stop=["never said"],
            stream=True,
        )
        chunks = iter(stream)
        next(chunks), next(chunks)
        assert all(busy < free for busy, free in zip(tokens_left(), idle, strict=True))  # a session is open
        stream.close()
        deadline = time.monotonic() + 30
        while tokens_left() != idle:
            assert time.monotonic() < deadline, f"the session stayed open: {tokens_left()} vs {idle}"
            time.sleep(0.2)
    # and the API goes on serving
    assert client.chat.completions.create(model=tiny_model.name, messages=MESSAGES, max_tokens=3).usage


@pytest.mark.parametrize(
    "fields, error, message",
    [
        (dict(model="no-such-model"), openai.NotFoundError, "not served here"),
        (dict(max_tokens=-3), openai.BadRequestError, "max_tokens"),
        (dict(messages=[{"role": "wizard", "content": "hi"}]), openai.BadRequestError, r"messages\[0\].role"),
        (dict(temperature=3), openai.BadRequestError, "temperature"),
        (dict(top_logprobs=3), openai.BadRequestError, "top_logprobs: needs logprobs"),
        (dict(stop=["a", "b", "c", "d", "e"]), openai.BadRequestError, "stop"),
        (dict(max_tokens=301), openai.BadRequestError, "at most 300"),
    ],
    ids=[
        "unknown-model",
        "negative-max-tokens",
        "wrong-role",
        "temperature",
        "top-logprobs",
        "stops",
        "too-long",
    ],
)
def test_bad_requests_raise_the_clients_matching_errors(client, tiny_model, fields, error, message):
    request = dict(model=tiny_model.name, messages=MESSAGES, max_tokens=4) | fields
    with pytest.raises(error, match=message) as raised:
        client.chat.completions.create(**request)
    assert raised.value.body["param"] is not None or error is not openai.BadRequestError


def http(method: str, url: str, body: bytes | None = None, key: str | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a plain HTTP request, as a tool other than the openai package sends it."""
    request = urllib.request.Request(url, data=body, method=method)
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_wrong_or_missing_key_is_refused(api, tiny_model):
    for key in ("wrong", None):
        status, body = http("GET", f"{api.address}/models", key=key)
        assert status == 401 and body["error"]["type"] == "authentication_error"
    with openai.OpenAI(base_url=api.address, api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
            wrong.chat.completions.create(model=tiny_model.name, messages=MESSAGES, max_tokens=2)
    status, body = http("POST", f"{api.address}/chat/completions", b"{not json", key=KEY)
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = http("GET", f"{api.address}/nowhere", key=KEY)
    assert status == 404 and body["error"]["message"]


def test_missing_blocks_are_503_and_load_is_429(model_folder, tiny_model, tiny_swarm, tmp_path):
    """A second API serving two models: one the swarm serves, one it doesn't; one completion at a time."""
    orphan = write_tiny_llama(tmp_path / "orphan-llama", num_blocks=2, seed=7)
    write_tiny_tokenizer(orphan)
    process = tiny_swarm.start_api(
        [str(model_folder), str(orphan)], "--max-concurrent", "1", "--wait-for-blocks", "1"
    )
    try:
        with openai.OpenAI(
            base_url=process.address, api_key="none", max_retries=0, timeout=TIMEOUT
        ) as client:
            assert [m.id for m in client.models.list().data] == [tiny_model.name]  # the orphan is incomplete
            assert client.models.retrieve("orphan-llama").swarm["missing_blocks"] == [0, 1]
            with pytest.raises(
                openai.InternalServerError, match="no node of the swarm serves them"
            ) as raised:
                client.chat.completions.create(model="orphan-llama", messages=MESSAGES, max_tokens=2)
            assert raised.value.status_code == 503
            stream = client.chat.completions.create(
                model=tiny_model.name, messages=MESSAGES, max_tokens=300, stop=["never said"], stream=True
            )
            next(iter(stream))
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model=tiny_model.name, messages=MESSAGES, max_tokens=2)
            stream.close()
    finally:
        process.terminate()


@pytest.mark.slow
def test_a_node_killed_mid_stream_does_not_change_the_text(model_folder, tokenizer, local_model, tmp_path):
    from swarm.local import LocalSwarm

    ids = chat_ids(tokenizer)
    expected = tokenizer.decode(local_tokens(local_model, ids, 40), skip_special_tokens=True)
    with LocalSwarm(workdir=tmp_path) as swarm:
        swarm.start_bootstrap()
        nodes = swarm.start_nodes(str(model_folder), ["0:3", "3:6", "3:6"])
        process = swarm.start_api([str(model_folder)], "--max-tokens", "300")
        with (
            DistributedModelForCausalLM.from_pretrained(model_folder, swarm.initial_peers) as observer,
            openai.OpenAI(base_url=process.address, api_key="none", max_retries=0, timeout=TIMEOUT) as client,
        ):
            idle = {
                n.peer_id: observer.run_async(get_info(observer.p2p, n.peer_id, 10)).server.cache_tokens_left
                for n in nodes
            }
            stream = client.chat.completions.create(
                model=model_folder.name,
                messages=MESSAGES,
                temperature=0,
                max_tokens=40,
                stream=True,
                logprobs=True,  # a chunk per token, even one whose text is held back (a split character)
            )
            chunks = iter(stream)
            text = "".join(next(chunks).choices[0].delta.content or "" for _ in range(6))
            # the node of blocks [3, 6) that holds the session's cache
            busy = [
                n
                for n in nodes[1:]
                if observer.run_async(get_info(observer.p2p, n.peer_id, 10)).server.cache_tokens_left
                < idle[n.peer_id]
            ]
            assert len(busy) == 1
            busy[0].kill()
            text += "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == expected
