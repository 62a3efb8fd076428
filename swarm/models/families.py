"""The model families a node can serve: one registry keyed by `config.model_type`.

Each entry names what differs between decoder-only families: which of transformers' classes build the
decoder layers, rotary embeddings and final norm, how the client head scales embeddings and soft-caps
logits, and which mask each layer needs. Classes are found by transformers' own naming convention
(`modeling_<type>.<Prefix>DecoderLayer`, `<Prefix>RotaryEmbedding`, `<Prefix>RMSNorm`), so a family with
the standard layer interface is one line here. Nothing outside this module tests a family's name.
"""

from __future__ import annotations

import importlib
import inspect
from collections import defaultdict
from dataclasses import dataclass
from functools import cache

import torch
from transformers import PretrainedConfig

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class Family:
    """What a span and a client head need to know about one `model_type`."""

    model_type: str
    prefix: str  # class-name prefix in transformers' modeling module: Llama, Gemma3, Qwen3Moe, ...
    module: str = ""  # transformers.models.<module>; defaults to model_type
    embed_scale_sqrt_hidden: bool = False  # Gemma: embeddings are multiplied by sqrt(hidden_size)
    attn_implementation: str = "sdpa"  # what the span's layers use (Gemma2 soft-caps scores: eager)
    experts_implementation: str | None = None  # MoE: the kernel transformers picks by default

    @property
    def modeling(self):
        return importlib.import_module(
            f"transformers.models.{self.module or self.model_type}.modeling_{self.module or self.model_type}"
        )

    def _class(self, suffix: str) -> type:
        return getattr(self.modeling, f"{self.prefix}{suffix}")

    @property
    def decoder_layer(self) -> type[torch.nn.Module]:
        return self._class("DecoderLayer")

    @property
    def rotary_embedding(self) -> type[torch.nn.Module]:
        return self._class("RotaryEmbedding")

    @property
    def norm(self) -> type[torch.nn.Module]:
        return self._class("RMSNorm")

    def embed_scale(self, config: PretrainedConfig) -> float:
        return config.hidden_size**0.5 if self.embed_scale_sqrt_hidden else 1.0

    @staticmethod
    def logit_softcap(config: PretrainedConfig) -> float | None:
        return getattr(config, "final_logit_softcapping", None)

    @staticmethod
    def layer_types(config: PretrainedConfig) -> list[str]:
        """Each layer's mask kind, as the family's own `*Model.forward` picks it: `config.layer_types`
        where the config has them, else a sliding window on every layer when `sliding_window` is set."""
        types = getattr(config, "layer_types", None)
        if types is not None:
            return list(types)
        sliding = getattr(config, "sliding_window", None) is not None
        return [SLIDING if sliding else FULL] * config.num_hidden_layers


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("llama", "Llama"),
        Family("mistral", "Mistral"),
        Family("qwen2", "Qwen2"),
        Family("qwen3", "Qwen3"),
        Family("phi3", "Phi3"),
        Family("mixtral", "Mixtral", experts_implementation="grouped_mm"),  # experts stay inside the block
        Family("qwen3_moe", "Qwen3Moe", experts_implementation="grouped_mm"),
        Family("gemma2", "Gemma2", embed_scale_sqrt_hidden=True, attn_implementation="eager"),
        Family("gemma3_text", "Gemma3", module="gemma3", embed_scale_sqrt_hidden=True),
    )
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


class UnsupportedModelError(ValueError):
    pass


def get_family(model_type: str | None) -> Family:
    """The registry entry for `model_type`, or one error naming every supported family."""
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return FAMILIES[model_type]


def family_of(config: PretrainedConfig) -> Family:
    return get_family(config.model_type)


@cache
def _parameters(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def cache_argument(layer_class: type) -> str:
    """The keyword the installed transformers' decoder layer takes its KV cache by (`cache` since 5.2x,
    `past_key_values` before)."""
    return "cache" if "cache" in _parameters(layer_class.forward) else "past_key_values"


def takes_argument(fn, name: str) -> bool:
    return name in _parameters(fn)


def position_embeddings_by_type(
    rotary: torch.nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, layer_types: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(cos, sin) per layer type: one rotary for all (most families) or one per type (Gemma 3)."""
    if takes_argument(type(rotary).forward, "layer_type"):
        return {kind: rotary(hidden, position_ids, kind) for kind in sorted(set(layer_types))}
    shared = rotary(hidden, position_ids)
    return defaultdict(lambda: shared)


def convert_block_tensors(model_type: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> the names and layouts the installed transformers' modules hold, with
    transformers' own conversion mapping (e.g. Mixtral's per-expert `w1/w2/w3` -> fused expert tensors)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    transforms = get_checkpoint_conversion_mapping(model_type) or []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not converters and not renamings:
        return tensors
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple[int, str], tuple[WeightConverter, dict[str, list[torch.Tensor]]]] = {}
    for name in sorted(tensors, key=dot_natural_key):  # experts in index order
        renamed, pattern = rename_source_key(name, renamings, converters)
        if pattern is None:
            out[renamed] = tensors[name]
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        groups.setdefault((id(converter), renamed), (converter, defaultdict(list)))[1][pattern].append(
            tensors[name]
        )
    for (_, renamed), (converter, collected) in groups.items():
        for op in converter.operations:
            collected = op.convert(
                collected,
                source_patterns=converter.source_patterns,
                target_patterns=converter.target_patterns,
                full_layer_name=renamed,
            )
        prefix, _, suffix = next(renamed.partition(k) for k in collected if k in renamed)
        out.update({prefix + k + suffix: v for k, v in collected.items()})
    return out
