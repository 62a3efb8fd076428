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


def cached_block_rps(checkpoint, device: str, dtype_name: str, cache_dir=None) -> float:
    """Single-token steps/s of one block of this model on this device and dtype, measured once and cached."""
    import json

    from swarm.models.fetch import default_cache_dir
    from swarm.models.span import load_span
    from swarm.utils.tensors import FLOAT_DTYPES

    path = (
        default_cache_dir(cache_dir)
        / "throughput"
        / f"{checkpoint.name}-{device.replace(':', '_')}-{dtype_name}.json"
    )
    try:
        return float(json.loads(path.read_text())["block_rps"])
    except (OSError, ValueError, KeyError):
        pass
    span = load_span(checkpoint, 0, 1, FLOAT_DTYPES[dtype_name], device)
    _, block_rps = measure_span_rps(span, device, FLOAT_DTYPES[dtype_name])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"block_rps": block_rps}))
    tmp.replace(path)
    return block_rps
