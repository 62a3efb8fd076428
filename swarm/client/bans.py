"""Nodes the client stopped trusting for now, with exponential back-off."""

from __future__ import annotations

import threading
import time

MAX_ENTRIES = 4096  # peers remembered; the ones whose bans ended longest ago are forgotten first


class BanList:
    """A node that fails is skipped for `base` seconds, doubling on each further failure up to `cap`.

    A node whose ban ended `forgive_after` seconds ago is forgiven (its next failure counts as its first),
    and at most `max_entries` peers are remembered, so a long-lived client's list stays small.
    """

    def __init__(
        self,
        base: float = 15.0,
        cap: float = 600.0,
        clock=time.monotonic,
        forgive_after: float = 1800.0,
        max_entries: int = MAX_ENTRIES,
    ):
        self.base, self.cap, self.clock = base, cap, clock
        self.forgive_after, self.max_entries = forgive_after, max_entries
        self._until: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._prune()
            return len(self._until)

    def _prune(self) -> None:
        """Forget peers whose ban ended more than forgive_after ago, then the oldest beyond max_entries."""
        horizon = self.clock() - self.forgive_after
        for peer in [peer for peer, until in self._until.items() if until < horizon]:
            del self._until[peer]
            self._failures.pop(peer, None)
        if len(self._until) > self.max_entries:
            for peer in sorted(self._until, key=self._until.get)[: len(self._until) - self.max_entries]:
                del self._until[peer]
                self._failures.pop(peer, None)

    def ban(self, peer_id: str) -> float:
        """Ban `peer_id`; returns how long the ban lasts."""
        with self._lock:
            self._prune()
            failures = self._failures.get(peer_id, 0) + 1
            self._failures[peer_id] = failures
            duration = min(self.cap, self.base * 2 ** (failures - 1))
            self._until[peer_id] = self.clock() + duration
            return duration

    def cool_down(self, peer_id: str, seconds: float) -> None:
        """Skip a busy node for `seconds` without counting a failure (its next ban does not double)."""
        with self._lock:
            self._prune()
            self._until[peer_id] = max(self._until.get(peer_id, 0.0), self.clock() + seconds)

    def forgive(self, peer_id: str) -> None:
        """A node that served well starts from a clean slate."""
        with self._lock:
            self._until.pop(peer_id, None)
            self._failures.pop(peer_id, None)

    def failures(self, peer_id: str) -> int:
        """How many times `peer_id` was banned since it was last forgiven."""
        with self._lock:
            return self._failures.get(peer_id, 0)

    def active(self) -> set[str]:
        """Peers banned right now."""
        now = self.clock()
        with self._lock:
            return {peer for peer, until in self._until.items() if until > now}

    def __contains__(self, peer_id: str) -> bool:
        return peer_id in self.active()
