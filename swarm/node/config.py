"""What `swarm node` can be told. Kept free of torch so the CLI starts fast."""

from __future__ import annotations

from dataclasses import dataclass, field

from swarm.node.limits import NodeLimits

DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass
class NodeConfig:
    """Everything `swarm node` can be told; the CLI's defaults are these defaults."""

    model: str
    blocks: tuple[int, int] | None = None
    initial_peers: list[str] = field(default_factory=list)
    model_name: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    host: str = "127.0.0.1"
    port: int = 0
    announce_maddrs: list[str] = field(default_factory=list)  # what peers dial, if not host:port
    identity_path: str | None = None
    update_period: float = 30.0
    cache_dir: str | None = None
    throughput: float | None = None
    num_blocks: int | None = None  # instead of `blocks`: pick where to serve this many blocks
    balance_period: float = 120.0  # seconds between rebalancing checks (randomized by +-50%)
    balance_quality: float = 0.75  # move when bottleneck now / bottleneck after moving is below this
    limits: NodeLimits = field(default_factory=NodeLimits)
    # pin bit-reproducible kernels and announce the profile; None: decided by deterministic_by_default
    deterministic: bool | None = None
    metrics_port: int | None = None  # serve Prometheus text at http://metrics_host:PORT/metrics (0: any port)
    metrics_host: str = "127.0.0.1"

    @property
    def is_deterministic(self) -> bool:
        """Whether this node runs the deterministic profile: as told, else deterministic_by_default."""
        if self.deterministic is not None:
            return self.deterministic
        return deterministic_by_default(self.dtype, self.device)


DETERMINISTIC_THREADS = 1
"""CPU threads of a deterministic node (NodeConfig has no thread setting): the thread count is part of the
profile, so nodes only agree bit for bit when they use the same one."""


def deterministic_by_default(dtype: str, device: str) -> bool:
    """The one default rule for --deterministic: on for float32 on CPU, where pinning kernels makes results
    bit-reproducible (the price is mostly the single thread); off elsewhere (reduced precision, GPUs),
    where it is opt-in."""
    return dtype == "float32" and device.partition(":")[0] == "cpu"


def parse_blocks(text: str) -> tuple[int, int]:
    """Parse "A:B" into a half-open block range."""
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise ValueError(f"--blocks must look like START:END, got {text!r}") from None
    if not 0 <= start < end:
        raise ValueError(f"--blocks {text}: need 0 <= START < END")
    return start, end
