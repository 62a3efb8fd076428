"""Decode steps of sessions with caches of different lengths, run as one batch (decode_sessions), give each
session what its step alone gives, in every family (sliding windows included), and leave each session's
cache as its step alone would."""

import pytest
import torch

from swarm.models.families import SUPPORTED_MODEL_TYPES, get_family
from swarm.models.span import BlockSpan
from swarm.models.tiny import tiny_family_config
from swarm.node.batched_decode import can_batch, decode_sessions
from swarm.node.kv_cache import SpanCache

PROMPT_LENGTHS = [3, 9, 12]  # past the tiny families' sliding window of 8 tokens, and short of it


def make_span(model_type: str) -> BlockSpan:
    torch.manual_seed(0)
    config = tiny_family_config(model_type, num_blocks=3)
    config._attn_implementation = get_family(model_type).attn_implementation
    span = BlockSpan(config, 0, 3).eval()
    with torch.no_grad():  # some layers (fused experts) leave their weights uninitialised
        for parameter in span.parameters():
            parameter.normal_(std=0.1) if parameter.dim() > 1 else parameter.fill_(1.0)
    return span


def prefilled_caches(span: BlockSpan, layers: slice) -> list[SpanCache]:
    caches = []
    for length in PROMPT_LENGTHS:
        cache = SpanCache(layers.start, layers.stop - layers.start, 24)
        prompt = torch.randn(
            1, length, span.config.hidden_size, generator=torch.Generator().manual_seed(length)
        )
        span(prompt, cache=cache, layers=layers)
        caches.append(cache)
    return caches


BATCHED_TYPES = [t for t in SUPPORTED_MODEL_TYPES if get_family(t).attn_implementation != "eager"]


def test_spans_with_eager_attention_do_not_batch():
    """Gemma 2's eager attention soft-caps its scores in its own function: no one original to wrap."""
    assert not can_batch(make_span("gemma2"))
    assert can_batch(make_span("llama"))


@pytest.mark.parametrize("model_type", BATCHED_TYPES)
@torch.inference_mode()
def test_batched_steps_equal_each_sessions_step_alone(model_type):
    span = make_span(model_type)
    layers = slice(1, 3)  # a later slice: the caches store its first layer at index 0
    alone, batched = prefilled_caches(span, layers), prefilled_caches(span, layers)
    positions = torch.tensor([[length] for length in PROMPT_LENGTHS])
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        hidden = torch.randn(len(PROMPT_LENGTHS), 1, span.config.hidden_size, generator=generator)
        expected = torch.cat([span(hidden[i : i + 1], cache=alone[i], layers=layers) for i in range(3)])
        got = decode_sessions(span, hidden, positions + step, batched, layers)
        assert torch.isfinite(expected).all()
        # only the matmuls' batch size differs: BLAS may round 3 rows otherwise than 1
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for ours, theirs in zip(batched, alone, strict=True):
        assert ours.get_seq_length() == theirs.get_seq_length()
        torch.testing.assert_close(ours.layers[-1].keys, theirs.layers[-1].keys, rtol=1e-4, atol=1e-5)
    # outside a batched step the wrapped attention is the family's own: a step alone is bit-equal again
    reference = prefilled_caches(span, layers)[0]
    fresh = prefilled_caches(span, layers)[0]
    one = torch.randn(1, 1, span.config.hidden_size)
    assert torch.equal(span(one, cache=fresh, layers=layers), span(one, cache=reference, layers=layers))


@torch.inference_mode()
def test_each_session_attends_only_to_its_own_cache():
    """Two sessions with the same new token but different histories get different outputs, each its own."""
    span = make_span("llama")
    caches = prefilled_caches(span, slice(0, 3))[:2]
    hidden = torch.randn(1, 1, span.config.hidden_size).expand(2, 1, -1).contiguous()
    positions = torch.tensor([[PROMPT_LENGTHS[0]], [PROMPT_LENGTHS[1]]])
    out = decode_sessions(span, hidden, positions, caches, slice(0, 3))
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    assert [cache.get_seq_length() for cache in caches] == [PROMPT_LENGTHS[0] + 1, PROMPT_LENGTHS[1] + 1]
