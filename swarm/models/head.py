"""The parts of a model that run on the client: token embeddings, the final norm and the LM head."""

from __future__ import annotations

import torch
from torch import nn

from swarm.models.checkpoint import Checkpoint
from swarm.models.families import family_of


class ClientHead(nn.Module):
    """Embeddings in, logits out; everything between runs on the swarm."""

    def __init__(
        self,
        embed_tokens: nn.Embedding,
        norm: nn.Module,
        lm_head: nn.Linear,
        embed_scale: float = 1.0,
        logit_softcap: float | None = None,
    ):
        super().__init__()
        self.embed_tokens, self.norm, self.lm_head = embed_tokens, norm, lm_head
        self.embed_scale, self.logit_softcap = embed_scale, logit_softcap

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)
        if self.embed_scale != 1.0:  # as Gemma scales embeddings: a float32 scalar cast to the weight dtype
            embeds = embeds * torch.tensor(self.embed_scale).to(self.embed_tokens.weight.dtype)
        return embeds

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden_states))
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits


def load_client_head(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> ClientHead:
    """Load embeddings, final norm and LM head (tied to the embeddings when the checkpoint says so), with
    the family's embedding scale, norm class and final logit soft-capping."""
    config = checkpoint.config
    family = family_of(config)
    available = checkpoint.tensor_files()
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    tied = config.tie_word_embeddings or "lm_head.weight" not in available
    if not tied:
        names.append("lm_head.weight")
    tensors = checkpoint.load_tensors(names, dtype=dtype)
    embed = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id, _weight=None)
    embed.weight = nn.Parameter(tensors["model.embed_tokens.weight"], requires_grad=False)
    norm = family.norm(config.hidden_size, eps=config.rms_norm_eps)
    norm.weight = nn.Parameter(tensors["model.norm.weight"], requires_grad=False)
    lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    lm_head.weight = embed.weight if tied else nn.Parameter(tensors["lm_head.weight"], requires_grad=False)
    head = ClientHead(embed, norm, lm_head, family.embed_scale(config), family.logit_softcap(config))
    return head.eval()


def load_generation_config(path):
    """The checkpoint's generation_config.json (EOS and pad ids), or None when it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None
