"""Token timing shared by the CLI and the benchmarks."""

from __future__ import annotations

import statistics
import time


class TokenTimer:
    """A generate() streamer that records when the prompt and each new token arrive."""

    def __init__(self):
        self.prompt_at: float | None = None
        self.token_times: list[float] = []

    def put(self, tokens) -> None:
        now = time.perf_counter()
        if self.prompt_at is None:
            self.prompt_at = now  # generate() puts the prompt first
        else:
            self.token_times.append(now)

    def end(self) -> None:
        pass

    @property
    def first_token_s(self) -> float | None:
        """Prompt to first new token: the prefill."""
        return None if not self.token_times else self.token_times[0] - self.prompt_at

    def gaps(self) -> list[float]:
        """Seconds between consecutive new tokens (the decode steps, prefill excluded)."""
        return [b - a for a, b in zip(self.token_times[:-1], self.token_times[1:], strict=True)]

    def summary(self) -> str:
        if not self.token_times:
            return "no tokens generated"
        gaps = self.gaps()
        per_token = statistics.median(gaps) if gaps else self.first_token_s
        return (
            f"{len(self.token_times)} tokens: first token (prefill) {1000 * self.first_token_s:.0f} ms, "
            f"then {1000 * per_token:.1f} ms/token median ({1 / per_token:.1f} tokens/s)"
        )


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
