"""The swarm model as a transformers model, so that transformers' own `generate()` drives the swarm: every
decoding strategy and logits processor it offers (beam search included) runs over an inference session."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from swarm.client.generation import positions_from_mask

if TYPE_CHECKING:
    from swarm.client.inference import InferenceSession
    from swarm.client.model import DistributedModelForCausalLM


class SessionCache(Cache):
    """A transformers Cache whose keys and values live on the swarm's nodes, in an inference session.

    Beam search's `reorder_cache` is passed on with the next step as `hypo_ids`: every node reorders its
    rows, and the session reorders the history it would replay on a replacement node.
    """

    def __init__(self, session: InferenceSession):
        super().__init__(layers=[])
        self.session = session
        self.pending_reorder: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.num_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        beam_idx = beam_idx.cpu()
        pending = self.pending_reorder
        self.pending_reorder = beam_idx if pending is None else pending[beam_idx]

    @property
    def is_compileable(self) -> bool:
        return False


class TransformersModel(PreTrainedModel, GenerationMixin):
    """A view of a `DistributedModelForCausalLM` as a transformers `PreTrainedModel` with `GenerationMixin`
    (`model.as_transformers()`): `generate()` is transformers' own, over a session per call.

    The embeddings and head run here, the blocks on the swarm; a node lost mid-generation is replaced and
    replayed as in any session. Prompt tuning and spot checks work as in the swarm model's sessions, but
    checks are waited for at each step (transformers' loop cannot take tokens back).
    """

    _supports_sdpa = True  # attention runs on the nodes; nothing here to dispatch
    _supports_attention_backend = True

    def __init__(self, swarm_model: DistributedModelForCausalLM):
        super().__init__(copy.deepcopy(swarm_model.config))
        self.swarm_model = swarm_model
        self.generation_config = copy.deepcopy(swarm_model.generation_config)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.swarm_model.head.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.swarm_model.head.lm_head

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: SessionCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Without a cache: the swarm model's forward (labels give the loss). With a `SessionCache` (what
        `generate()` passes): the new tokens through the session; logits for them."""
        if cache is None:
            return self.swarm_model(
                input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                labels=labels,
                inputs_embeds=inputs_embeds,
            )
        if not isinstance(cache, SessionCache):
            raise TypeError(
                f"the swarm keeps its cache on the nodes: expected a SessionCache, got {type(cache)}"
            )
        model = self.swarm_model
        hidden = model.head.embed(input_ids.to(model.device)) if inputs_embeds is None else inputs_embeds
        new_tokens = hidden.shape[1]
        positions = None
        mask = attention_mask.cpu() if attention_mask is not None else None
        if mask is not None:
            positions = positions_from_mask(mask)[:, -new_tokens:]
            mask = mask if bool((mask == 0).any()) else None  # a full mask is the default
        hypo_ids, cache.pending_reorder = cache.pending_reorder, None
        out = cache.session.step(hidden, position_ids=positions, attention_mask=mask, hypo_ids=hypo_ids)
        return CausalLMOutputWithPast(logits=model.head.logits(out.to(model.device)).float())

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """transformers' `generate()`, over a new inference session sized for this call (closed after)."""
        if kwargs.get("cache") is not None:
            return super().generate(inputs, **kwargs)
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("generate() over the swarm needs input_ids")
        config = kwargs.get("generation_config") or self.generation_config
        max_new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
        if max_new_tokens is not None:
            max_length = input_ids.shape[1] + max_new_tokens
        else:
            max_length = kwargs.get("max_length", config.max_length)
        with self.swarm_model.inference_session(max_length=max_length) as session:
            return super().generate(inputs, cache=SessionCache(session), **kwargs)
