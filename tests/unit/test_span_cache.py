"""SpanCache's row reordering (beam search) and the snapshot a failed step is rolled back to."""

import torch

from swarm.node.kv_cache import SpanCache


def filled_cache(batch=3, layers=2, seq=4) -> SpanCache:
    cache = SpanCache(first_layer=5, num_layers=layers, max_length=16)  # layers number from the span's first
    for layer in range(layers):
        keys = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 2, seq, 8) + layer
        cache.update(keys.clone(), -keys.clone(), 5 + layer)
    return cache


def rows(cache: SpanCache, layer: int) -> list[float]:
    return cache.layers[layer].keys[:, 0, 0, 0].tolist()


def test_reorder_makes_row_i_what_row_hypo_i_was_in_every_layer():
    cache = filled_cache()
    cache.reorder(torch.tensor([2, 0, 0]))
    assert rows(cache, 0) == [2.0, 0.0, 0.0] and rows(cache, 1) == [3.0, 1.0, 1.0]
    assert cache.layers[1].values[:, 0, 0, 0].tolist() == [-3.0, -1.0, -1.0]
    assert cache.get_seq_length() == 4


def test_restore_undoes_a_reorder_and_the_tokens_a_failed_step_added():
    cache = filled_cache()
    before = cache.snapshot()
    cache.reorder(torch.tensor([1, 1, 2]))
    cache.update(torch.zeros(3, 2, 1, 8), torch.zeros(3, 2, 1, 8), 5)  # a step half-way through its layers
    cache.restore(before)
    assert rows(cache, 0) == [0.0, 1.0, 2.0] and rows(cache, 1) == [1.0, 2.0, 3.0]
    assert cache.get_seq_length() == 4
