"""Tokenizers for the same names and paths that nodes and clients accept."""

from __future__ import annotations

import os


def load_tokenizer(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """The tokenizer of a built-in model, a checkpoint folder or a .gguf file (converted once, cached)."""
    from transformers import AutoTokenizer

    from swarm.models.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(name_or_path, cache_dir)
    try:
        return AutoTokenizer.from_pretrained(checkpoint.path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{name_or_path!r} has no tokenizer at {checkpoint.path}: {e}") from e
