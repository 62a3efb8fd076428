"""The OpenAI API's parts without a swarm: request checking, stop sequences in streamed text, penalties."""

import pytest
import torch

from swarm.api.choices import ChoiceText
from swarm.api.errors import APIError
from swarm.api.requests import parse_request
from swarm.api.sampling import OpenAIPenalties


class CharTokenizer:
    """One character per token id (ord), to drive ChoiceText without a real tokenizer."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != 0)


def feed(choice: ChoiceText, text: str) -> list[str]:
    return [choice.add(ord(c)) for c in text]


def test_stop_sequences_are_cut_and_never_shown_in_part():
    choice = ChoiceText(CharTokenizer(), ["END", "xy"], eos_ids={0})
    shown = feed(choice, "abEN")
    assert "".join(shown) == "ab"  # "EN" might begin "END": held back
    assert feed(choice, "c") == ["ENc"]  # it didn't
    assert feed(choice, "xEND") == ["", "x", "", ""] and choice.finish_reason == "stop"
    assert choice.text == "abENcx" and choice.num_tokens == 9
    assert feed(choice, "more") == ["", "", "", ""]  # nothing after the end


def test_eos_ends_a_choice_and_length_flushes_what_was_held():
    choice = ChoiceText(CharTokenizer(), ["xyz"], eos_ids={0})
    feed(choice, "abxy")
    assert choice.add(0) == "xy" and choice.finish_reason == "stop" and choice.num_tokens == 5
    other = ChoiceText(CharTokenizer(), ["xyz"], eos_ids={0})
    feed(other, "abxy")
    assert other.finish("length") == "xy" and other.text == "abxy" and other.finish_reason == "length"


def test_penalties_follow_openais_definition():
    prompt = torch.tensor([[5, 5, 7]])
    generated = torch.tensor([[1, 1, 2]])
    scores = torch.zeros(1, 8)
    out = OpenAIPenalties(3, frequency_penalty=0.5, presence_penalty=0.25)(
        torch.cat([prompt, generated], 1), scores
    )
    # token 1 twice, token 2 once; the prompt's tokens do not count
    assert out[0].tolist() == [0, -1.25, -0.75, 0, 0, 0, 0, 0]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0]",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": True}, "n"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": float("nan")},
            "temperature",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream_options": {}},
            "stream_options",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": -1}, "seed"),
    ],
)
def test_bad_chat_requests_name_their_field(body, param):
    with pytest.raises(APIError) as raised:
        parse_request("chat", body)
    assert raised.value.status == 400 and raised.value.param == param


def test_a_good_request_reads_as_openai_means_it():
    spec = parse_request(
        "chat",
        {
            "model": "m",
            "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}],
            "max_completion_tokens": 9,
            "stop": "END",
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert spec.messages == [{"role": "system", "content": "be brief"}]
    assert (spec.max_tokens, spec.stop, spec.include_usage, spec.temperature) == (9, ["END"], True, 1.0)
    completion = parse_request("completion", {"model": "m", "prompt": ["hello"], "logprobs": 3, "echo": True})
    assert (completion.prompt, completion.top_logprobs, completion.logprobs, completion.echo) == (
        "hello",
        3,
        True,
        True,
    )
