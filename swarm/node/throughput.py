"""A quick start-up measurement of how fast this node runs its span."""

from __future__ import annotations

import os
import time

import torch

from swarm.models.span import BlockSpan


@torch.inference_mode()
def measure_span_rps(
    span: BlockSpan, device: str, dtype: torch.dtype, tokens: int = 32, repeats: int = 3
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


def cached_rps(
    checkpoint, num_blocks: int, device: str, dtype_name: str, cache_dir, measure
) -> tuple[float, float]:
    """(forward tokens/s, steps/s) of `num_blocks` blocks of this model on this device and dtype.

    Measured once with `measure()` and cached in `<cache>/throughput/`, so restarts skip the measurement.
    """
    import json

    from swarm.models.fetch import default_cache_dir

    config = checkpoint.config
    shape = f"{config.model_type}-h{config.hidden_size}-f{getattr(config, 'intermediate_size', 0)}"
    name = f"{checkpoint.name}-{shape}-{num_blocks}blocks-{device.replace(':', '_')}-{dtype_name}.json"
    path = default_cache_dir(cache_dir) / "throughput" / name
    try:
        cached = json.loads(path.read_text())
        return float(cached["forward_rps"]), float(cached["inference_rps"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    forward_rps, inference_rps = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"forward_rps": forward_rps, "inference_rps": inference_rps}))
    tmp.replace(path)
    return forward_rps, inference_rps


def cached_block_rps(checkpoint, device: str, dtype_name: str, cache_dir=None) -> float:
    """Single-token steps/s of one block (for choosing a span before loading it)."""
    from swarm.models.span import load_span
    from swarm.utils.tensors import FLOAT_DTYPES

    def measure():
        span = load_span(checkpoint, 0, 1, FLOAT_DTYPES[dtype_name], device)
        return measure_span_rps(span, device, FLOAT_DTYPES[dtype_name])

    return cached_rps(checkpoint, 1, device, dtype_name, cache_dir, measure)[1]
