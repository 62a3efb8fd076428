"""How a client talks to the swarm: timeouts, retries, routing filters and message sizes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ClientConfig:
    """How the client talks to the swarm."""

    initial_peers: list[str] = field(default_factory=list)
    request_timeout: float = 60.0
    # a session step's reply late by this many seconds: check on a new stream that the node still answers,
    # and fail over at once if it does not (an open stream to a dead node can stay silent until the timeout)
    liveness_period: float = 5.0
    dht_timeout: float = 10.0
    max_retries: int = 3
    wait_for_blocks: float = 30.0  # how long to wait for missing blocks to appear before giving up
    verify_weights: bool = True  # skip nodes whose weight hashes differ from the model's
    max_step_tokens: int = 1024  # longer prompts are prefilled in chunks of at most this many tokens
    max_chunk_rows: int | None = None  # forward/backward micro-batch rows (None: as many as fit a message)
    refresh_period: float = 10.0  # seconds between re-reads of the swarm from the DHT
    allowed_servers: list[str] | None = None  # if set, route only through these peer ids
    blocked_servers: list[str] = field(default_factory=list)  # never route through these peer ids
    # if set, route only through nodes whose weights are of these --quant kinds (e.g. ["none"]: full
    # precision only); None: any
    allowed_quant: list[str] | None = None
    # the fraction of span calls also given to a second node and compared (swarm.verification.spot_check)
    verify_rate: float = 0.0
    honour_verdicts: bool = True  # re-check verdicts found in the DHT and avoid the nodes they convict
    # inference steps go node to node (server-to-server push): the client sends a step to the first node
    # only and each node pushes its output to the next, all of them replying to the client too; off: the
    # client takes every span's output to the next itself (a client round trip per span). On by default:
    # 182 vs 235 and 215 vs 254 ms/token over 3 nodes at 50 ms RTT (benchmarks/results/wan-cpu-smollm2.jsonl),
    # 92 vs 100 on loopback (inference-cpu-smollm2.jsonl)
    push: bool = True

    def __post_init__(self):
        if self.liveness_period <= 0:
            raise ValueError(f"liveness_period must be positive, got {self.liveness_period}")
        if not 0.0 <= self.verify_rate <= 1.0:
            raise ValueError(f"verify_rate must be within [0, 1], got {self.verify_rate}")
        if self.allowed_quant is not None:
            from swarm.dht.records import QUANT_NAMES

            if isinstance(self.allowed_quant, str) or not self.allowed_quant:
                raise ValueError(f"allowed_quant must be a non-empty list of {list(QUANT_NAMES)} or None")
            unknown = [q for q in self.allowed_quant if q not in QUANT_NAMES]
            if unknown:
                raise ValueError(f"allowed_quant: unknown {unknown}; choose from {list(QUANT_NAMES)}")
