"""A session's KV cache, preallocated for its max_length: each step writes its keys and values in place.

transformers' DynamicCache concatenates every layer's keys and values at every step (a copy of the whole
history per token); here each layer holds one buffer of (batch, kv_heads, max_length, head_dim) allocated at
the first step, and the attention sees a view of its first `length` positions. The views hold the same
numbers in the same order as DynamicCache's tensors, so outputs are equal, and masks are sized from the
tokens held (not from max_length), as transformers sizes them for a dynamic cache.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicLayer


def kv_bytes_per_token(config: PretrainedConfig, num_layers: int, dtype: torch.dtype) -> int:
    """Bytes that one token of one sequence takes in a cache over `num_layers` layers (keys and values)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * num_layers * heads * head_dim * torch.empty((), dtype=dtype).element_size()


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in `capacity`-position buffers; `keys`, `values` view the filled part."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads, _, head_dim = key_states.shape
        self.key_buffer = key_states.new_empty((batch, heads, self.capacity, head_dim))
        self.value_buffer = value_states.new_empty(
            (batch, value_states.shape[1], self.capacity, value_states.shape[3])
        )
        self.is_initialized = True
        self._expose()

    def _expose(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:  # the node checks max_length before a step: this is a bug, not bad input
            raise RuntimeError(f"KV cache overflow: {end} tokens into a cache of {self.capacity}")
        self.key_buffer[:, :, self.length : end].copy_(key_states)
        self.value_buffer[:, :, self.length : end].copy_(value_states)
        self.length = end
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def truncate(self, length: int) -> None:
        """Forget the tokens from `length` on (the next step overwrites them in place)."""
        if length < self.length:
            self.length = length
            if self.is_initialized:
                self._expose()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0:
            self.truncate(max(0, self.length + tokens_to_remove))

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes row rows[i], in new buffers: a snapshot of the old ones can still be restored."""
        if not self.is_initialized:
            return
        rows = rows.to(self.device)
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = torch.empty_like(old)
            new[:, :, : self.length] = old[:, :, : self.length].index_select(0, rows)
            setattr(self, name, new)
        self._expose()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.reorder(beam_idx)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for this layer (0 before the first step)."""
        if not self.is_initialized:
            return 0
        return self.key_buffer.nbytes + self.value_buffer.nbytes


class SpanCache(Cache):
    """A KV cache for a slice of a span's layers, preallocated for `max_length` tokens.

    The span's attention layers number themselves from the span's first block; a session that uses a
    later slice stores its first layer at index 0, so the cache's length and masks see real entries.
    """

    def __init__(self, first_layer: int, num_layers: int, max_length: int):
        super().__init__(layers=[PreallocatedLayer(max_length) for _ in range(num_layers)])
        self.first_layer = first_layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(key_states, value_states, layer_idx - self.first_layer, *args, **kwargs)

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes what row rows[i] was, in every layer (beam search's hypotheses)."""
        for layer in self.layers:
            layer.reorder(rows)

    def snapshot(self) -> list[tuple]:
        """Every layer's buffers and length, which `restore` puts back. No copy: a step only writes past
        the length it started from, and a reorder writes into new buffers."""
        return [(layer.key_buffer, layer.value_buffer, layer.length) for layer in self.layers]

    def restore(self, snapshot: list[tuple]) -> None:
        for layer, (keys, values, length) in zip(self.layers, snapshot, strict=True):
            layer.key_buffer, layer.value_buffer, layer.length = keys, values, length
            layer.is_initialized = keys is not None  # a first step that failed allocated nothing to keep
            if layer.is_initialized:
                layer._expose()
            else:
                layer.keys = layer.values = None

    def truncate(self, length: int) -> None:
        """Forget every token from `length` on (a rewind, or undoing a step that failed half-way)."""
        for layer in self.layers:
            layer.truncate(length)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values across the layers."""
        return sum(layer.nbytes for layer in self.layers)
