"""One decode step of several sessions through a span as one call (#17 part 2).

Each session has its own KV cache of its own length, so only the position-independent work is batched:
the sessions' new tokens go through every layer's linear layers, norms and MLP as one batch, while the
attention runs per session, on that session's own cache and with the mask it would get alone. The
attention is reached through transformers' attention interface: the family's attention implementation is
wrapped once per process by one that, inside a batched step on this thread, calls the original per session
(outside one, it calls the original unchanged). Each session's keys and values are written into its own
SpanCache, exactly as in a step alone.

What differs from a step alone is the matmuls' batch size: BLAS kernels may sum in another order for 8
rows than for 1, so outputs can differ in the last bits (not in greedy tokens, in practice); hence a node
flag (--batch-decode), not the default.
"""

from __future__ import annotations

import threading

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from swarm.models.families import position_embeddings_by_type
from swarm.models.span import BlockSpan
from swarm.node.kv_cache import SpanCache

_active = threading.local()  # the batched step running on this thread, if any
_wrapped: set[str] = set()
_wrap_lock = threading.Lock()


class _SessionsStep:
    """What the wrapped attention needs during one batched step: the sessions' caches, their masks by layer
    type, the type of the layer running, and the keys and values each session's cache returned."""

    def __init__(self, caches: list[SpanCache], masks: list[dict]):
        self.caches, self.masks = caches, masks
        self.kind = ""
        self.views: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """The cache interface a layer calls: row i goes into session i's cache."""
        self.views = [
            cache.update(key_states[i : i + 1], value_states[i : i + 1], layer_idx, *args, **kwargs)
            for i, cache in enumerate(self.caches)
        ]
        return key_states, value_states  # unused: the wrapped attention takes each session's views


def _wrap_attention(name: str) -> None:
    """Route the attention implementation `name` through a per-session dispatcher (once per process)."""
    with _wrap_lock:
        if name in _wrapped:
            return
        if name == "eager" or name not in ALL_ATTENTION_FUNCTIONS:
            raise ValueError(f"cannot batch decode steps over attention implementation {name!r}")
        original = ALL_ATTENTION_FUNCTIONS[name]

        def per_session(module, query, key, value, attention_mask, **kwargs):
            step: _SessionsStep | None = getattr(_active, "step", None)
            if step is None:
                return original(module, query, key, value, attention_mask, **kwargs)
            outputs = [
                original(module, query[i : i + 1], keys, values, step.masks[i][step.kind], **kwargs)[0]
                for i, (keys, values) in enumerate(step.views)
            ]
            return torch.cat(outputs, dim=0), None

        ALL_ATTENTION_FUNCTIONS[name] = per_session
        _wrapped.add(name)


def can_batch(span: BlockSpan) -> bool:
    """Whether the span's attention is a registered implementation (sdpa, flash...) that can be wrapped.
    Not "eager": each family passes its own eager function as the default (Gemma 2's soft-caps scores),
    so there is no one original to call per session."""
    name = getattr(span.config, "_attn_implementation", None)
    return name in _wrapped or (name != "eager" and name in ALL_ATTENTION_FUNCTIONS)


def decode_sessions(
    span: BlockSpan, hidden: torch.Tensor, position_ids: torch.Tensor, caches: list[SpanCache], layers: slice
) -> torch.Tensor:
    """One new token of each session, `hidden` (sessions, 1, hidden_size) at `position_ids` (sessions, 1),
    through `layers` of `span`, session i's keys and values going to `caches[i]`. Returns (sessions, 1,
    hidden_size). The caches must already hold exactly the tokens before these positions."""
    name = span.config._attn_implementation
    _wrap_attention(name)
    layer_types = span.layer_types[layers]
    masks = [
        span.masks(hidden[i : i + 1], None, cache, position_ids[i : i + 1], layer_types)
        for i, cache in enumerate(caches)
    ]
    step = _SessionsStep(caches, masks)
    position_embeddings = position_embeddings_by_type(span.rotary_emb, hidden, position_ids, layer_types)
    extra = {span._cache_argument: step}
    if span._passes_use_cache:
        extra["use_cache"] = True
    _active.step = step
    try:
        for layer, kind in zip(span.layers[layers], layer_types, strict=True):
            step.kind = kind
            hidden = layer(
                hidden,
                attention_mask=None,
                position_ids=position_ids,
                position_embeddings=position_embeddings[kind],
                **extra,
            )
    finally:
        _active.step = None
    return hidden
