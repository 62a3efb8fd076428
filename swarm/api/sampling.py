"""OpenAI's sampling extras as transformers logits processors: frequency and presence penalties, and the
log-probabilities of each step's distribution."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import LogitsProcessor


class OpenAIPenalties(LogitsProcessor):
    """logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty, where count[j] is how
    often token j was generated so far (the prompt does not count), as OpenAI defines them."""

    def __init__(self, prompt_length: int, frequency_penalty: float, presence_penalty: float):
        self.prompt_length = prompt_length
        self.frequency_penalty, self.presence_penalty = frequency_penalty, presence_penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :].to(scores.device)
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype)
        )
        return (
            scores - counts * self.frequency_penalty - (counts > 0).to(scores.dtype) * self.presence_penalty
        )


class LogprobRecorder(LogitsProcessor):
    """Keeps the log-probabilities of the last step's distribution (the model's own: before penalties and
    temperature) for the streamer to read when that step's tokens arrive. Changes nothing."""

    def __init__(self):
        self.latest: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.latest = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def entries(self, tokens: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
        """Per row: (the log-probability of its chosen token, the `top` most likely tokens and theirs)."""
        if self.latest is None:
            return [(0.0, []) for _ in tokens]
        result = []
        for row, token in enumerate(tokens):
            logprobs = self.latest[row]
            best = []
            if top:
                values, indices = logprobs.topk(top)
                best = list(zip(indices.tolist(), values.tolist(), strict=True))
            result.append((float(logprobs[token]), best))
        return result
