"""A quick start-up measurement of how fast this node runs its span."""

from __future__ import annotations

import time

import torch

from swarm.models.span import LlamaSpan


@torch.inference_mode()
def measure_span_rps(
    span: LlamaSpan, device: str, dtype: torch.dtype, tokens: int = 32, repeats: int = 3
) -> tuple[float, float]:
    """(forward tokens/s for a `tokens`-long sequence, single-token steps/s), best of `repeats`."""
    hidden = torch.randn(1, tokens, span.config.hidden_size, device=device, dtype=dtype)

    def best_time(inputs: torch.Tensor) -> float:
        span(inputs)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            span(inputs)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return max(min(times), 1e-6)

    return tokens / best_time(hidden), 1.0 / best_time(hidden[:, :1])
