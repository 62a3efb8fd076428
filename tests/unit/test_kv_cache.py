"""The preallocated SpanCache against transformers' DynamicCache (what nodes used before): the same outputs
bit for bit over a prefill, decode steps, a rewind and a beam reorder, in every family (sliding windows
included), and exactly the bytes the node's budget counts for it."""

import pytest
import torch
from transformers.cache_utils import DynamicCache

from swarm.models.families import SUPPORTED_MODEL_TYPES, get_family
from swarm.models.span import BlockSpan
from swarm.models.tiny import tiny_family_config
from swarm.node.kv_cache import SpanCache, kv_bytes_per_token


def reference_cache(first_layer: int) -> DynamicCache:
    """A DynamicCache whose layers number from the span slice's first layer, as the node's old cache."""
    cache = DynamicCache()
    update = cache.update
    cache.update = lambda k, v, layer_idx, *a, **kw: update(k, v, layer_idx - first_layer, *a, **kw)
    return cache


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_preallocated_cache_gives_dynamic_cache_outputs_and_takes_the_budgeted_bytes(model_type):
    torch.manual_seed(0)
    config = tiny_family_config(model_type, num_blocks=3)
    config._attn_implementation = get_family(model_type).attn_implementation
    span = BlockSpan(config, 0, 3).eval()
    with torch.no_grad():  # some layers (fused experts) leave their weights uninitialised
        for parameter in span.parameters():
            parameter.normal_(std=0.1) if parameter.dim() > 1 else parameter.fill_(1.0)
    layers, batch, max_length = slice(1, 3), 2, 20  # a later slice: its first layer is stored at index 0
    ours, theirs = SpanCache(1, 2, max_length), reference_cache(1)
    # a 6-token prefill, then steps past the tiny families' sliding window of 8 tokens
    steps = [torch.randn(batch, 6, config.hidden_size)] + [torch.randn(batch, 1, config.hidden_size)] * 6
    with torch.inference_mode():
        for step in steps:
            expected = span(step, cache=theirs, layers=layers)
            assert torch.isfinite(expected).all()
            assert torch.equal(span(step, cache=ours, layers=layers), expected)
        assert ours.get_seq_length() == theirs.get_seq_length() == 12
        # a beam reorder, then a rewind of 3 tokens (the old cache: cropped) and a different step
        rows = torch.tensor([1, 1])
        ours.reorder(rows)
        theirs.reorder_cache(rows)
        ours.truncate(9)
        theirs.crop(-3)
        step = torch.randn(batch, 2, config.hidden_size)
        assert torch.equal(span(step, cache=ours, layers=layers), span(step, cache=theirs, layers=layers))
    dtype = next(span.parameters()).dtype
    assert ours.nbytes == batch * max_length * kv_bytes_per_token(config, 2, dtype)


def test_a_step_that_fails_leaves_a_new_cache_as_it_was():
    cache = SpanCache(0, 2, max_length=8)
    before = cache.snapshot()
    cache.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), 0)  # layer 0 ran, then the step failed
    cache.restore(before)
    assert cache.get_seq_length() == 0 and cache.nbytes == 0
    keys, _ = cache.update(torch.full((1, 2, 2, 4), 7.0), torch.ones(1, 2, 2, 4), 0)
    assert keys.shape == (1, 2, 2, 4) and bool((keys == 7).all())


def test_writing_past_max_length_is_refused():
    cache = SpanCache(0, 1, max_length=4)
    cache.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), 0)
    with pytest.raises(RuntimeError, match="overflow"):
        cache.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 0)
