"""The hardware a simulated node brings: a GPU class (which sets how many blocks it holds and how fast it is
per block) and a log-normal spread around the class's speed.

Classes, for an 80-block model (a 70B-class Llama in 4-bit):

| class | share | inference span | speed per block (relative) |
|---|---|---|---|
| 8 GB (consumer) | 40% | 10 blocks | 1.0 |
| 24 GB (3090/4090, A10) | 35% | 24 blocks | 2.5 |
| 48 GB (A6000, L40) | 18% | 40 blocks | 4.0 |
| 80 GB (A100, H100) | 7% | 60 blocks | 8.0 |

Each node's speed is its class speed times a log-normal factor (sigma 0.4: network, CPU and driver
differences). As the node announces it, an inference node's throughput is its per-block speed divided by its
span length (steps/s through the whole span, as `swarm.node.server` estimates it); a training peer's is its
per-block speed (every stage holds the same number of blocks, so this is proportional to its samples/s).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NUM_BLOCKS = 80
SPEED_SPREAD_SIGMA = 0.4


@dataclass(frozen=True)
class GpuClass:
    name: str
    share: float
    span_length: int
    block_speed: float


GPU_CLASSES = (
    GpuClass("8GB", 0.40, 10, 1.0),
    GpuClass("24GB", 0.35, 24, 2.5),
    GpuClass("48GB", 0.18, 40, 4.0),
    GpuClass("80GB", 0.07, 60, 8.0),
)


@dataclass(frozen=True)
class Hardware:
    """What one node brings, whenever it is online."""

    gpu: str
    span_length: int
    block_speed: float

    @property
    def span_throughput(self) -> float:
        """Steps/s through its whole span: what an inference node announces."""
        return self.block_speed / self.span_length


def sample_hardware(rng: random.Random) -> Hardware:
    gpu = rng.choices(GPU_CLASSES, weights=[c.share for c in GPU_CLASSES])[0]
    speed = gpu.block_speed * rng.lognormvariate(0.0, SPEED_SPREAD_SIGMA)
    return Hardware(gpu.name, gpu.span_length, speed)
