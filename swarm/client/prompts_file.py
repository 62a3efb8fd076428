"""Trained prompts on disk: a safetensors file of the prompt tensors and the tuning mode that made them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

TUNING_MODE_KEY = "swarm.tuning_mode"
TENSORS = {
    "ptune": ("prompt_embeddings",),
    "deep_ptune": ("prompt_embeddings", "intermediate_prompt_embeddings"),
}


@dataclass(frozen=True)
class SavedPrompts:
    tuning_mode: str
    tensors: dict[str, torch.Tensor]

    @property
    def pre_seq_len(self) -> int:
        return self.tensors["prompt_embeddings"].shape[0]


def save_prompts(path: str | os.PathLike, tuning_mode: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` (detached, on CPU) and `tuning_mode` to a safetensors file."""
    cpu = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    save_file(cpu, os.fspath(path), metadata={TUNING_MODE_KEY: tuning_mode})


def load_prompts(path: str | os.PathLike) -> SavedPrompts:
    """Read a file written by `save_prompts`; raises ValueError when it is not one."""
    try:
        tensors = load_file(os.fspath(path))
        with safe_open(os.fspath(path), "pt") as opened:
            metadata = opened.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read prompts from {path}: {e}") from e
    mode = metadata.get(TUNING_MODE_KEY)
    if mode not in TENSORS or set(tensors) != set(TENSORS[mode]):
        raise ValueError(
            f"{path} is not a prompts file (tuning mode {mode!r}, tensors {sorted(tensors)}); "
            "write one with model.save_prompts()"
        )
    if any(tensor.dim() != 2 for tensor in tensors.values()):
        raise ValueError(f"{path}: prompt tensors must be 2D (prompt length, size)")
    if not all(torch.isfinite(tensor).all() for tensor in tensors.values()):
        raise ValueError(f"{path}: the prompts hold NaN or infinite values")
    return SavedPrompts(mode, tensors)
