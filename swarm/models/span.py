"""A span of consecutive decoder blocks of any registered family, built from transformers' own layers (no
patching): the family registry (swarm.models.families) names the classes and the masks each layer needs."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from swarm.models.checkpoint import BLOCK_PREFIX, Checkpoint
from swarm.models.families import (
    SLIDING,
    cache_argument,
    convert_block_tensors,
    family_of,
    position_embeddings_by_type,
    takes_argument,
)


def default_position_ids(
    attention_mask: torch.Tensor | None, batch: int, seq_len: int, past_len: int, device: torch.device
) -> torch.Tensor:
    """Positions as transformers' generate() derives them: counting only unpadded tokens when masked."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + seq_len, device=device).unsqueeze(0).expand(batch, -1)
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -seq_len:]


class BlockSpan(nn.Module):
    """Blocks [start, end) of a model. Layer indices are local, so a KV cache holds only this span."""

    def __init__(self, config: PretrainedConfig, start: int, end: int):
        super().__init__()
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(
                f"span [{start}, {end}) is outside the model's {config.num_hidden_layers} blocks"
            )
        family = family_of(config)
        if family.experts_implementation is not None:  # the kernel from_pretrained picks, on a copy: a
            config = copy.copy(config)  # client's PreTrainedModel refuses a config that names one
            config._experts_implementation = family.experts_implementation
        self.config, self.start, self.end = config, start, end
        layer_class = family.decoder_layer
        self.layers = nn.ModuleList(layer_class(config, layer_idx=i) for i in range(end - start))
        self.rotary_emb = family.rotary_embedding(config)
        self.layer_types = family.layer_types(config)[start:end]
        self._cache_argument = cache_argument(layer_class)
        self._passes_use_cache = takes_argument(layer_class.forward, "use_cache")

    def view(self, first: int, stop: int) -> BlockSpan:
        """Layers [first, stop) of this span as a span of its own (the same modules, so hooks apply)."""
        view = BlockSpan.__new__(BlockSpan)
        nn.Module.__init__(view)
        view.config, view.start, view.end = self.config, self.start + first, self.start + stop
        view.layers = nn.ModuleList(self.layers[first:stop])
        view.rotary_emb = self.rotary_emb
        view.layer_types = self.layer_types[first:stop]
        view._cache_argument, view._passes_use_cache = self._cache_argument, self._passes_use_cache
        return view

    def masks(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        position_ids: torch.Tensor,
        layer_types: list[str],
    ) -> dict:
        """The attention mask of each layer type, as the family's `*Model.forward` builds them."""
        mask_args = dict(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        return {
            kind: (create_sliding_window_causal_mask if kind == SLIDING else create_causal_mask)(**mask_args)
            for kind in set(layer_types)
        }

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        layers: slice = slice(None),
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run `hidden_states` (batch, seq, hidden) through the span (or a sub-slice of its layers).

        attention_mask is 2D over past + new tokens; position_ids default to what generate() would use.
        `prompts` (layers, batch or 1, prefix, hidden) are deep prompts: layer i's is added to the first
        `prefix` positions of that layer's input. Layers are called as the family's own `*Model.forward`
        calls them in the installed transformers (its mask per layer type, its cache keyword).
        """
        batch, seq_len, _ = hidden_states.shape
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = default_position_ids(
                attention_mask, batch, seq_len, past_len, hidden_states.device
            )
        layer_types = self.layer_types[layers]
        masks = self.masks(hidden_states, attention_mask, cache, position_ids, layer_types)
        position_embeddings = position_embeddings_by_type(
            self.rotary_emb, hidden_states, position_ids, layer_types
        )
        extra = {self._cache_argument: cache}
        if self._passes_use_cache:
            extra["use_cache"] = cache is not None
        for index, (layer, kind) in enumerate(zip(self.layers[layers], layer_types, strict=True)):
            if prompts is not None:
                prefix = prompts.shape[2]
                hidden_states = torch.cat(
                    [hidden_states[:, :prefix] + prompts[index], hidden_states[:, prefix:]], dim=1
                )
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[kind],
                position_ids=position_ids,
                position_embeddings=position_embeddings[kind],
                **extra,
            )
        return hidden_states


LlamaSpan = BlockSpan  # the name from when Llama was the only family


def load_span(
    checkpoint: Checkpoint,
    start: int,
    end: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    prepare_layer: Callable[[nn.Module], None] | None = None,
) -> BlockSpan:
    """Build blocks [start, end) on the meta device and fill them with only those blocks' tensors
    (converted to the installed transformers' layout where the family needs it, e.g. fused experts).

    Blocks are read one at a time and moved to `device` in `dtype`; `prepare_layer` (e.g. quantizing its
    linear layers) runs on each right after, so at most one block is ever held in full precision.
    """
    config = checkpoint.config
    with torch.device("meta"):
        span = BlockSpan(config, start, end)
    for block in range(start, end):
        names = checkpoint.block_tensor_names(block)
        tensors = convert_block_tensors(config.model_type, checkpoint.load_tensors(names, dtype=dtype))
        state = {name.removeprefix(f"{BLOCK_PREFIX}{block}."): tensor for name, tensor in tensors.items()}
        layer = span.layers[block - start]
        missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match block {block}: missing {missing}, unexpected {unexpected}"
            )
        layer.to(device=device, dtype=dtype)
        if prepare_layer is not None:
            prepare_layer(layer)
    # rotary buffers are computed, not stored: rebuild them for real on the target device
    with torch.device(device):
        span.rotary_emb = family_of(config).rotary_embedding(config).to(dtype=dtype)
    return span.eval().requires_grad_(False)
