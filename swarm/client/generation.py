"""Token-by-token generation over an inference session, with transformers' decoding semantics."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from swarm.client.inference import InferenceSession

if TYPE_CHECKING:
    from swarm.client.model import DistributedModelForCausalLM

DEFAULT_MAX_NEW_TOKENS = 20


def make_warpers(do_sample: bool, temperature: float | None, top_k: int | None, top_p: float | None):
    """The same warpers, in the same order, that transformers' generate() applies when sampling."""
    warpers = LogitsProcessorList()
    if not do_sample:
        return warpers
    if temperature is not None and temperature != 1.0:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None and top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return warpers


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers derives them from a (left-)padded mask."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def _as_id_set(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


@torch.inference_mode()
def generate(
    model: DistributedModelForCausalLM,
    input_ids: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    do_sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    session: InferenceSession | None = None,
    streamer=None,
    generator: torch.Generator | None = None,
    logits_processor: LogitsProcessorList | None = None,
) -> torch.Tensor:
    """Generate after `input_ids` (or continue `session`); returns every token of the session so far.

    `logits_processor` runs on each step's logits before the sampling warpers, as in transformers.
    """
    if input_ids is None and (session is None or session.output_ids is None):
        raise ValueError("generate() needs input_ids unless it continues a session that has tokens")
    if input_ids is not None and (input_ids.dim() != 2 or input_ids.shape[1] == 0):
        raise ValueError(
            f"input_ids must be a non-empty (batch, seq) tensor, got shape {tuple(input_ids.shape)}"
        )
    if attention_mask is not None and (input_ids is None or attention_mask.shape != input_ids.shape):
        raise ValueError("attention_mask must have the shape of input_ids")
    generation_config = getattr(model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(generation_config, "eos_token_id", None) or model.config.eos_token_id
    if pad_token_id is None:
        pad_token_id = getattr(generation_config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = model.config.pad_token_id
    eos_ids = _as_id_set(eos_token_id)
    if pad_token_id is None:
        pad_token_id = min(eos_ids) if eos_ids else 0

    known = 0 if session is None or session.output_ids is None else session.output_ids.shape[1]
    prompt_len = known + (0 if input_ids is None else input_ids.shape[1])
    if max_new_tokens is None:
        max_new_tokens = max_length - prompt_len if max_length is not None else DEFAULT_MAX_NEW_TOKENS
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be non-negative, got {max_new_tokens}")

    # the last new token is returned, not fed: the nodes see it when the session continues
    if session is not None and prompt_len + max_new_tokens - 1 > session.max_length:
        raise ValueError(
            f"{prompt_len} tokens plus {max_new_tokens} new ones exceed the session's max_length "
            f"{session.max_length}"
        )
    if session is not None and input_ids is not None and session.batch_size not in (None, input_ids.shape[0]):
        raise ValueError(f"batch size {input_ids.shape[0]} differs from the session's {session.batch_size}")
    output_device = torch.device("cpu") if input_ids is None else input_ids.device
    own_session = session is None
    if own_session:
        session = model.inference_session(max_length=prompt_len + max_new_tokens)
    try:
        _extend(session, input_ids, attention_mask)
        warpers = make_warpers(do_sample, temperature, top_k, top_p)
        if streamer is not None:
            streamer.put(session.output_ids[:, session.num_tokens :].cpu())
        # spot checks run beside the next steps; a failed one takes generation back to the step it checked.
        # Not with a streamer: the tokens it has shown could not be taken back
        session.defer_checks = streamer is None
        start = session.output_ids.shape[1]
        eos = torch.tensor(sorted(eos_ids)) if eos_ids else None
        unfinished = torch.ones(session.batch_size, dtype=torch.bool)
        while True:
            while session.output_ids.shape[1] - start < max_new_tokens and unfinished.any():
                rewound = session.settle_checks(session.check_backlog)
                if rewound is not None:
                    unfinished = _drop_tokens_after(session, rewound, start, eos)
                    continue
                logits = _next_token_logits(model, session)
                if logits_processor is not None:
                    logits = logits_processor(session.output_ids, logits)
                scores = warpers(session.output_ids, logits)
                if do_sample:
                    probs = torch.softmax(scores, dim=-1)
                    next_tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
                else:
                    next_tokens = scores.argmax(dim=-1)
                next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
                _append(session, next_tokens.unsqueeze(1), unfinished.long().unsqueeze(1))
                if streamer is not None:
                    streamer.put(next_tokens.cpu())
                if eos is not None:
                    unfinished &= ~torch.isin(next_tokens, eos)
            # what is returned rests on steps whose checks held up, or on their winners' recomputation
            rewound = session.settle_checks()
            if rewound is None:
                break
            unfinished = _drop_tokens_after(session, rewound, start, eos)
        if streamer is not None:
            streamer.end()
        return session.output_ids.to(output_device, copy=True)
    finally:
        session.defer_checks = False
        if own_session:
            session.close()


def _drop_tokens_after(
    session: InferenceSession, position: int, start: int, eos: torch.Tensor | None
) -> torch.Tensor:
    """The session rewound to a step at `position`: drop the tokens generated from its output and later
    ones (the fed tokens of this call before them stay); returns which rows are unfinished."""
    keep = max(position + 1, start)
    session.output_ids = session.output_ids[:, :keep]
    session.attention_mask = session.attention_mask[:, :keep]
    if eos is None:
        return torch.ones(session.batch_size, dtype=torch.bool)
    return ~torch.isin(session.output_ids[:, start:], eos).any(dim=1)


def _extend(session: InferenceSession, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None):
    if input_ids is None:
        return
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _append(session, input_ids.cpu(), attention_mask.cpu())  # the session's bookkeeping lives on CPU


def _append(session: InferenceSession, ids: torch.Tensor, mask: torch.Tensor) -> None:
    if session.output_ids is None:
        session.output_ids, session.attention_mask = ids.clone(), mask.clone()
    else:
        session.output_ids = torch.cat([session.output_ids, ids], dim=1)
        session.attention_mask = torch.cat([session.attention_mask, mask.to(session.attention_mask.dtype)], 1)


def _next_token_logits(model: DistributedModelForCausalLM, session: InferenceSession) -> torch.Tensor:
    """Feed the tokens the nodes haven't seen yet; logits for the last one."""
    new_ids = session.output_ids[:, session.num_tokens :]
    mask = session.attention_mask
    positions = positions_from_mask(mask)[:, session.num_tokens :]
    padded = bool((mask == 0).any())
    device = getattr(model, "device", torch.device("cpu"))
    hidden = model.head.embed(new_ids.to(device))
    out = session.step(hidden, position_ids=positions, attention_mask=mask if padded else None)
    return model.head.logits(out[:, -1:].to(device)).float()[:, -1].cpu()
