"""A tiny random Llama written to a folder: real loading code, fast tests, no downloads."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(num_blocks: int = 6, hidden_size: int = 64, vocab_size: int = 256) -> LlamaConfig:
    """A small Llama with grouped-query attention (so the KV cache code paths are the real ones)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_blocks,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def write_tiny_llama(path: str | os.PathLike, num_blocks: int = 6, seed: int = 0, **kwargs) -> Path:
    """Save a randomly initialised tiny Llama (safetensors, fp32) into `path` and return it."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(num_blocks=num_blocks, **kwargs)).eval()
    # default init leaves logits nearly flat; scale up so greedy decoding has clear winners
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    return path
