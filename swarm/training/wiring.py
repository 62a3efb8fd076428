"""SWARM's stochastic wiring: each microbatch goes to the stage peer that is expected to be free first."""

from __future__ import annotations

import threading

BACKWARD_COST = 2.5  # a backward (with its recomputed forward) costs this many forwards
THROUGHPUT_EMA = 0.1
DEFAULT_THROUGHPUT = 1.0  # samples/s assumed before a peer is measured or announces anything


class StageWiring:
    """Expected busy time per peer of one stage; the least busy peer gets the next task.

    A task adds samples / throughput (x2.5 for backward) to its peer's key; throughput is an EMA of
    what the trainer measured, seeded by what the peer announced (or, when it announced nothing yet, by
    the stage's other peers); a peer seen for the first time enters at the current minimum, so it
    neither floods nor starves.
    """

    def __init__(self):
        self._busy: dict[str, float] = {}
        self._throughput: dict[str, float] = {}
        self._lock = threading.Lock()

    def choose(self, peers: dict[str, float], samples: int, backward: bool = False) -> str:
        """Pick among `peers` (peer id -> announced samples/s) and charge the task to the chosen one."""
        if not peers:
            raise LookupError("no peer to choose from")
        with self._lock:
            floor = min((self._busy[p] for p in peers if p in self._busy), default=0.0)
            known = [self._throughput[p] for p in peers if p in self._throughput]
            typical = sum(known) / len(known) if known else DEFAULT_THROUGHPUT
            for peer, announced in peers.items():
                if peer not in self._busy:
                    self._busy[peer] = floor
                    # a newcomer that announced nothing yet is assumed as fast as its stage's others
                    self._throughput[peer] = announced if announced > 0 else typical
            chosen = min(peers, key=lambda p: (self._busy[p], p))
            cost = samples / self._throughput[chosen] * (BACKWARD_COST if backward else 1.0)
            self._busy[chosen] += cost
            return chosen

    def measured(self, peer: str, samples: int, seconds: float, backward: bool = False) -> None:
        """Fold a finished task's speed into the peer's throughput estimate."""
        rate = samples / max(seconds, 1e-6) * (BACKWARD_COST if backward else 1.0)
        with self._lock:
            old = self._throughput.get(peer)
            self._throughput[peer] = (
                rate if old is None else (1 - THROUGHPUT_EMA) * old + THROUGHPUT_EMA * rate
            )

    def forget(self, peer: str) -> None:
        with self._lock:
            self._busy.pop(peer, None)
            self._throughput.pop(peer, None)
