"""Spans of blocks compute exactly what transformers computes, and hold only their own weights."""

import pytest
import torch
from transformers import LlamaForCausalLM

from swarm.models.checkpoint import all_block_hashes, block_hash, resolve_checkpoint
from swarm.models.head import load_client_head
from swarm.models.span import load_span


@pytest.fixture(scope="module")
def checkpoint(tiny_model):
    return resolve_checkpoint(tiny_model)


@pytest.fixture(scope="module")
def reference(tiny_model):
    return LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def test_chained_spans_match_transformers(checkpoint, reference):
    head = load_client_head(checkpoint)
    spans = [load_span(checkpoint, 0, 2), load_span(checkpoint, 2, 5), load_span(checkpoint, 5, 6)]
    input_ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(input_ids)
    mask[1, :4] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        for attention_mask, position_ids in [(None, None), (mask, positions)]:
            hidden = head.embed(input_ids)
            for span in spans:
                hidden = span(hidden, attention_mask=attention_mask, position_ids=position_ids)
            expected = reference(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
            torch.testing.assert_close(head.logits(hidden), expected, rtol=0, atol=1e-5)


def test_span_holds_only_its_blocks(checkpoint, reference):
    block_params = sum(p.numel() for p in reference.model.layers.parameters())
    span = load_span(checkpoint, 2, 4)
    held = sum(p.numel() for p in span.parameters())
    assert held == pytest.approx(block_params * 2 / 6, rel=1e-6)
    assert not any(p.is_meta for p in span.parameters())
    assert not any(p.requires_grad for p in span.parameters())


def test_span_outside_model_is_refused(checkpoint):
    with pytest.raises(ValueError):
        load_span(checkpoint, 4, 7)


def test_block_hashes_identify_weights(checkpoint, tmp_path):
    hashes = all_block_hashes(checkpoint, cache_dir=tmp_path)
    assert len(hashes) == 6 and len(set(hashes)) == 6
    assert hashes[3] == block_hash(checkpoint, 3)
    assert all_block_hashes(checkpoint, cache_dir=tmp_path) == hashes  # served from the cache file
