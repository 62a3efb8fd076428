"""A span of consecutive Llama decoder blocks, built from transformers' own layers (no patching)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from swarm.models.checkpoint import BLOCK_PREFIX, Checkpoint


def default_position_ids(
    attention_mask: torch.Tensor | None, batch: int, seq_len: int, past_len: int, device: torch.device
) -> torch.Tensor:
    """Positions as transformers' generate() derives them: counting only unpadded tokens when masked."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + seq_len, device=device).unsqueeze(0).expand(batch, -1)
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -seq_len:]


class LlamaSpan(nn.Module):
    """Blocks [start, end) of a Llama model. Layer indices are local, so a KV cache holds only this span."""

    def __init__(self, config: LlamaConfig, start: int, end: int):
        super().__init__()
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(
                f"span [{start}, {end}) is outside the model's {config.num_hidden_layers} blocks"
            )
        self.config, self.start, self.end = config, start, end
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, layer_idx=i) for i in range(end - start))
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        layers: slice = slice(None),
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run `hidden_states` (batch, seq, hidden) through the span (or a sub-slice of its layers).

        attention_mask is 2D over past + new tokens; position_ids default to what generate() would use.
        `prompts` (layers, batch or 1, prefix, hidden) are deep prompts: layer i's is added to the first
        `prefix` positions of that layer's input.
        """
        batch, seq_len, _ = hidden_states.shape
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = default_position_ids(
                attention_mask, batch, seq_len, past_len, hidden_states.device
            )
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for index, layer in enumerate(self.layers[layers]):
            if prompts is not None:
                prefix = prompts.shape[2]
                hidden_states = torch.cat(
                    [hidden_states[:, :prefix] + prompts[index], hidden_states[:, prefix:]], dim=1
                )
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=past_key_values is not None,
                position_embeddings=position_embeddings,
            )
        return hidden_states


def load_span(
    checkpoint: Checkpoint, start: int, end: int, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> LlamaSpan:
    """Build blocks [start, end) on the meta device and fill them with only those blocks' tensors."""
    with torch.device("meta"):
        span = LlamaSpan(checkpoint.config, start, end)
    state = {}
    for block in range(start, end):
        names = checkpoint.block_tensor_names(block)
        for name, tensor in checkpoint.load_tensors(names, dtype=dtype).items():
            state[f"layers.{block - start}.{name.removeprefix(f'{BLOCK_PREFIX}{block}.')}"] = tensor
    missing, unexpected = span.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not m.startswith("rotary_emb.")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the span: missing {missing}, unexpected {unexpected}")
    # rotary buffers are computed, not stored: rebuild them for real on the target device
    with torch.device(device):
        span.rotary_emb = LlamaRotaryEmbedding(checkpoint.config)
    return span.to(device=device, dtype=dtype).eval().requires_grad_(False)
