"""The parts of a model that run on the client: token embeddings, the final norm and the LM head."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from swarm.models.checkpoint import Checkpoint


class ClientHead(nn.Module):
    """Embeddings in, logits out; everything between runs on the swarm."""

    def __init__(self, embed_tokens: nn.Embedding, norm: nn.Module, lm_head: nn.Linear):
        super().__init__()
        self.embed_tokens, self.norm, self.lm_head = embed_tokens, norm, lm_head

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden_states))


def load_client_head(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> ClientHead:
    """Load embeddings, final norm and LM head (tied to the embeddings when the checkpoint says so)."""
    config = checkpoint.config
    available = checkpoint.tensor_files()
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    tied = config.tie_word_embeddings or "lm_head.weight" not in available
    if not tied:
        names.append("lm_head.weight")
    tensors = checkpoint.load_tensors(names, dtype=dtype)
    embed = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id, _weight=None)
    embed.weight = nn.Parameter(tensors["model.embed_tokens.weight"], requires_grad=False)
    norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    norm.weight = nn.Parameter(tensors["model.norm.weight"], requires_grad=False)
    lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    lm_head.weight = embed.weight if tied else nn.Parameter(tensors["lm_head.weight"], requires_grad=False)
    return ClientHead(embed, norm, lm_head).eval()


def load_generation_config(path):
    """The checkpoint's generation_config.json (EOS and pad ids), or None when it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None
