"""What `swarm node` can be told. Kept free of torch so the CLI starts fast."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from swarm.dht.relay_limits import RelayLimits
from swarm.node.limits import NodeLimits

DTYPE_NAMES = ("float32", "bfloat16", "float16")
AUTO = "auto"  # --num-blocks auto: as many blocks as fit in --max-memory
MAX_MEMORY_FRACTION = 0.9  # --max-memory's default: this much of the free RAM (or GPU memory) at start


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
    num_blocks: int | str | None = None  # instead of `blocks`: serve this many blocks (or AUTO) where needed
    quant: str = "none"  # one of QUANT_NAMES: weights of the blocks' linear layers
    max_memory: int | None = None  # bytes --num-blocks auto may fill (None: MAX_MEMORY_FRACTION of free)
    balance_period: float = 120.0  # seconds between rebalancing checks (randomized by +-50%)
    balance_quality: float = 0.75  # move when bottleneck now / bottleneck after moving is below this
    limits: NodeLimits = field(default_factory=NodeLimits)
    # pin bit-reproducible kernels and announce the profile; None: decided by deterministic_by_default
    deterministic: bool | None = None
    metrics_port: int | None = None  # serve Prometheus text at http://metrics_host:PORT/metrics (0: any port)
    metrics_host: str = "127.0.0.1"
    # torch intra-op threads for the span's compute (None: DETERMINISTIC_THREADS on a deterministic node,
    # else torch's default, one per core); a deterministic node announces it in its profile
    num_threads: int | None = None
    use_relay: bool = True  # unreachable from outside: reserve a slot on a bootstrap peer (a relay)
    relay_service: RelayLimits | None = None  # serve as a relay for peers behind NAT, with these caps

    @property
    def is_deterministic(self) -> bool:
        """Whether this node runs the deterministic profile: as told, else deterministic_by_default."""
        if self.deterministic is not None:
            return self.deterministic
        return deterministic_by_default(self.dtype, self.device)


DETERMINISTIC_THREADS = 1
"""CPU threads of a deterministic node unless --num-threads says otherwise: the thread count is part of
the profile, so nodes only agree bit for bit when they use the same one."""


def deterministic_by_default(dtype: str, device: str) -> bool:
    """The one default rule for --deterministic: on for float32 on CPU, where pinning kernels makes results
    bit-reproducible (the price is mostly the single thread); off elsewhere (reduced precision, GPUs),
    where it is opt-in."""
    return dtype == "float32" and device.partition(":")[0] == "cpu"


def parse_num_blocks(text: str) -> int | str:
    """Parse --num-blocks: a positive count or "auto"."""
    if text == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--num-blocks must be a positive number or {AUTO!r}, got {text!r}") from None
    if value < 1:
        raise ValueError(f"--num-blocks must be positive, got {value}")
    return value


_MEMORY_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_MEMORY_RE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """Parse a memory size such as "512MB", "2.5GiB" or "1073741824" (bytes; K/M/G/T are powers of 1024)."""
    match = _MEMORY_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"--max-memory must look like 512MB, 2.5GB or a number of bytes, got {text!r}")
    value = int(float(match.group(1)) * _MEMORY_UNITS[match.group(2).upper()])
    if value < 1:
        raise ValueError(f"--max-memory must be positive, got {text!r}")
    return value


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
