"""`swarm gateway`: a real gateway process over the tiny swarm, driven by a gRPC client built from the
generated stubs, as a client in another language would drive it."""

from __future__ import annotations

import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from metrics_helpers import scrape, value
from transformers import AutoTokenizer

from swarm.client import DistributedModelForCausalLM
from swarm.client.remote import get_info
from swarm.local import LocalSwarm
from swarm.models.tiny import write_tiny_tokenizer
from swarm.proto import gateway_pb2, gateway_pb2_grpc

TIMEOUT = 120  # seconds for one call: generation on 2 loaded cores is slow, never this slow


@pytest.fixture(scope="module")
def model_folder(tiny_model, tmp_path_factory):
    """The tiny Llama the swarm serves (same name, same weights) with a tokenizer, which the gateway needs
    for text."""
    folder = tmp_path_factory.mktemp("gateway") / tiny_model.name
    shutil.copytree(tiny_model, folder)
    write_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def gateway(model_folder, tiny_swarm):
    process = tiny_swarm.start_gateway(
        str(model_folder), "--max-new-tokens", "300", "--max-concurrent", "4", "--metrics-port", "0"
    )
    try:
        yield process
    finally:
        process.terminate()


@pytest.fixture(scope="module")
def stub(gateway):
    with grpc.insecure_channel(gateway.address) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


@pytest.fixture(scope="module")
def tokenizer(model_folder):
    return AutoTokenizer.from_pretrained(model_folder)


def generate(stub, **request) -> tuple[list[int], str, list[gateway_pb2.GenerateResponse]]:
    """(every token streamed, the text, the messages) of one Generate call."""
    messages = list(stub.Generate(gateway_pb2.GenerateRequest(**request), timeout=TIMEOUT))
    tokens = [t for m in messages for t in m.token_ids]
    return tokens, "".join(m.text for m in messages), messages


def local_greedy(local_model, ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = local_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(ids) :].tolist()


def prompt_ids(seed: int, length: int = 9) -> list[int]:
    return torch.randint(3, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_greedy_tokens_and_text_equal_local(stub, local_model, tokenizer):
    ids = prompt_ids(0)
    tokens, text, messages = generate(stub, input_ids=ids, max_new_tokens=24)
    expected = local_greedy(local_model, ids, 24)
    assert tokens == expected
    assert all(len(m.token_ids) == 1 for m in messages[:-1])  # one message per step, streamed
    last = messages[-1]
    assert last.finished and not any(m.finished for m in messages[:-1])
    assert last.finish_reason == ("stop" if expected[-1] == 2 else "length")
    assert text == tokenizer.decode(expected, skip_special_tokens=True)

    # a text prompt is tokenized by the gateway as the model's tokenizer does it
    prompt = "the swarm says"
    tokens, _, _ = generate(stub, prompt=prompt, max_new_tokens=8)
    assert tokens == local_greedy(local_model, tokenizer(prompt)["input_ids"], 8)


def test_concurrent_streams_each_equal_local(stub, local_model):
    requests = [dict(input_ids=prompt_ids(seed), max_new_tokens=16) for seed in (1, 2, 3)]
    with ThreadPoolExecutor(len(requests)) as pool:
        outcomes = list(pool.map(lambda r: generate(stub, **r)[0], requests))
    for request, tokens in zip(requests, outcomes, strict=True):
        assert tokens == local_greedy(local_model, request["input_ids"], 16)


def test_seeded_sampling_repeats_and_the_seed_matters(stub):
    request = dict(input_ids=prompt_ids(4), max_new_tokens=12, do_sample=True, temperature=1.5, top_k=50)
    first = generate(stub, seed=7, **request)[0]
    assert generate(stub, seed=7, **request)[0] == first
    assert any(generate(stub, seed=seed, **request)[0] != first for seed in (8, 9, 10))


def test_a_client_that_goes_away_frees_its_session_on_the_nodes(stub, tiny_model, tiny_swarm, tiny_nodes):
    nodes = tiny_nodes
    with DistributedModelForCausalLM.from_pretrained(tiny_model, tiny_swarm.initial_peers) as observer:

        def tokens_left() -> list[int]:
            return [
                observer.run_async(get_info(observer.p2p, node.peer_id, 10)).server.cache_tokens_left
                for node in nodes
            ]

        idle = tokens_left()
        call = stub.Generate(
            gateway_pb2.GenerateRequest(input_ids=prompt_ids(5), max_new_tokens=300), timeout=TIMEOUT
        )
        first = next(call)
        assert len(first.token_ids) == 1
        assert all(busy < free for busy, free in zip(tokens_left(), idle, strict=True))  # a session is open
        call.cancel()
        with pytest.raises(grpc.RpcError) as cancelled:
            list(call)
        assert cancelled.value.code() == grpc.StatusCode.CANCELLED
        deadline = time.monotonic() + 30
        while tokens_left() != idle:
            assert time.monotonic() < deadline, f"the sessions stayed open: {tokens_left()} vs {idle}"
            time.sleep(0.2)
    # and the gateway goes on serving
    assert len(generate(stub, input_ids=prompt_ids(6), max_new_tokens=4)[0]) == 4


@pytest.mark.parametrize(
    "request_fields, message",
    [
        (dict(prompt="hi", input_ids=[5, 6]), "exactly one of prompt and input_ids"),
        (dict(), "exactly one of prompt and input_ids"),
        (dict(input_ids=[5, 999]), "input_ids must be within"),
        (dict(input_ids=[5], max_new_tokens=301), "max_new_tokens is at most 300"),
        (dict(input_ids=[5], do_sample=True, temperature=0.0), "temperature must be > 0"),
        (dict(input_ids=[5], do_sample=True, top_p=1.5), "top_p must be within"),
        (dict(input_ids=[5], chat=True), "chat applies to a text prompt"),
    ],
)
def test_bad_requests_are_invalid_argument_and_change_nothing(stub, local_model, request_fields, message):
    with pytest.raises(grpc.RpcError) as refused:
        generate(stub, **request_fields)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in refused.value.details()
    ids = prompt_ids(7)
    assert generate(stub, input_ids=ids, max_new_tokens=4)[0] == local_greedy(local_model, ids, 4)


def test_health_is_the_swarm_map(stub):
    health = stub.Health(gateway_pb2.HealthRequest(), timeout=TIMEOUT)
    assert health.model == "tiny-llama" and health.num_blocks == 6
    assert health.complete and list(health.missing) == []
    online = sorted((n.start, n.end) for n in health.nodes if n.state == "ONLINE")
    assert online == [(0, 2), (2, 5), (5, 6)]
    assert all(n.throughput > 0 and n.peer_id.startswith("Qm") for n in health.nodes)
    as_json = json.loads(health.json)
    assert as_json["model"] == "tiny-llama" and len(as_json["nodes"]) == len(health.nodes)


def test_a_model_nobody_serves_is_unavailable_and_one_without_tokenizer_takes_ids(tiny_model, tiny_swarm):
    # the swarm's own folder, which has no tokenizer: the gateway serves input_ids only
    process = tiny_swarm.start_gateway(
        str(tiny_model), "--model-name", "nobody-serves-this", "--wait-for-blocks", "1"
    )
    try:
        assert "serving input_ids only" in process.log()
        with grpc.insecure_channel(process.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            with pytest.raises(grpc.RpcError) as no_text:
                generate(stub, prompt="hello", max_new_tokens=2)
            assert no_text.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no tokenizer" in no_text.value.details()
            with pytest.raises(grpc.RpcError) as missing:
                generate(stub, input_ids=[5, 6], max_new_tokens=2)
            assert missing.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no node" in missing.value.details()
            health = stub.Health(gateway_pb2.HealthRequest(), timeout=TIMEOUT)
            assert not health.complete and health.num_blocks == 0
    finally:
        process.terminate()


def test_metrics_count_calls_outcomes_and_tokens(stub, gateway):
    url = re.search(r"metrics at (http://\S+/metrics)", gateway.log()).group(1)
    before = scrape(url)
    generate(stub, input_ids=prompt_ids(8), max_new_tokens=5)
    with pytest.raises(grpc.RpcError):
        generate(stub, input_ids=[5, 999])
    stub.Health(gateway_pb2.HealthRequest(), timeout=TIMEOUT)
    after = scrape(url)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("swarm_gateway_requests_total", rpc="Generate", outcome="OK") == 1
    assert delta("swarm_gateway_requests_total", rpc="Generate", outcome="INVALID_ARGUMENT") == 1
    assert delta("swarm_gateway_requests_total", rpc="Health", outcome="OK") == 1
    assert delta("swarm_gateway_tokens_total") == 5
    assert delta("swarm_gateway_first_token_seconds_count") == 1
    assert delta("swarm_gateway_request_seconds_count", rpc="Generate") == 2
    assert value(after, "swarm_gateway_generations_running") == 0


def test_nodes_and_gateway_serve_the_same_on_uvloop(tiny_model, model_folder, local_model, tmp_path):
    """SWARM_EVENT_LOOP=uvloop (off by default: it was not faster) runs the nodes' and the gateway's loops
    on uvloop; the tokens stay those of local greedy decoding."""
    with LocalSwarm(workdir=tmp_path, env={"SWARM_EVENT_LOOP": "uvloop"}) as swarm:
        swarm.start_bootstrap()
        node = swarm.start_node(str(tiny_model), "0:6")
        gateway = swarm.start_gateway(str(model_folder))
        assert "event loop: uvloop" in node.log() and "event loop uvloop" in gateway.log()
        ids = prompt_ids(11)
        with grpc.insecure_channel(gateway.address) as channel:
            tokens = generate(gateway_pb2_grpc.GatewayStub(channel), input_ids=ids, max_new_tokens=8)[0]
        assert tokens == local_greedy(local_model, ids, 8)
