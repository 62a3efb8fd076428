"""Models: checkpoints (folders, GGUF, built-ins), spans of blocks, the client-side head, tokenizers."""

from swarm.models.tokenizer import load_tokenizer

__all__ = ["load_tokenizer"]
