"""What a node lets in at once: inference sessions and request streams, per peer and in total, and the
bytes buffered across all request streams.

Past a cap a request gets OVERLOADED at once (the client tries another node after a short cool-down)
instead of the node running out of memory or handlers. Per-peer caps keep one peer from taking the whole
node; the totals bound what many peers can take together.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator

from swarm.node.errors import RequestError
from swarm.node.limits import NodeLimits
from swarm.proto import swarm_pb2


class Admission:
    """Counts a node's open sessions and streams (per peer and in total) and its buffered request bytes."""

    def __init__(self, limits: NodeLimits):
        self.limits = limits
        self._lock = threading.Lock()
        self._sessions: Counter[str] = Counter()
        self._streams: Counter[str] = Counter()
        self._buffered = 0

    @contextlib.contextmanager
    def session(self, peer: str) -> Iterator[None]:
        """An inference session of `peer` for the block; OVERLOADED past max_sessions(_per_peer)."""
        with self._slot(
            self._sessions,
            peer,
            "inference sessions",
            self.limits.max_sessions,
            self.limits.max_sessions_per_peer,
        ):
            yield

    @contextlib.contextmanager
    def stream(self, peer: str) -> Iterator[None]:
        """A streamed call of `peer` for the block; OVERLOADED past max_streams(_per_peer)."""
        with self._slot(
            self._streams, peer, "request streams", self.limits.max_streams, self.limits.max_streams_per_peer
        ):
            yield

    @contextlib.contextmanager
    def _slot(self, counts: Counter[str], peer: str, what: str, total: int, per_peer: int) -> Iterator[None]:
        with self._lock:
            if counts[peer] >= per_peer:
                raise RequestError(
                    swarm_pb2.Error.OVERLOADED,
                    f"{per_peer} {what} of yours are open here already (the limit)",
                )
            if sum(counts.values()) >= total:
                raise RequestError(
                    swarm_pb2.Error.OVERLOADED, f"this node has {total} {what} open (its limit)"
                )
            counts[peer] += 1
        try:
            yield
        finally:
            with self._lock:
                counts[peer] -= 1
                if counts[peer] <= 0:
                    del counts[peer]

    def counts(self) -> tuple[int, int, int]:
        """(open sessions, open streams, buffered bytes), for tests and status."""
        with self._lock:
            return sum(self._sessions.values()), sum(self._streams.values()), self._buffered

    def buffer(self) -> BufferedBytes:
        """A ledger of one stream's buffered bytes, counted against max_buffered_bytes until closed."""
        return BufferedBytes(self)

    def _take(self, nbytes: int) -> bool:
        with self._lock:
            if self._buffered + nbytes > self.limits.max_buffered_bytes:
                return False
            self._buffered += nbytes
            return True

    def _give_back(self, nbytes: int) -> None:
        with self._lock:
            self._buffered -= nbytes


class BufferedBytes:
    """One stream's share of the node's buffered bytes (see `Admission.buffer`)."""

    def __init__(self, admission: Admission):
        self.admission, self.held = admission, 0

    def take(self, nbytes: int) -> None:
        """Count `nbytes` more; OVERLOADED when the node's buffers across all streams would pass the cap."""
        if not self.admission._take(nbytes):
            limit = self.admission.limits.max_buffered_bytes
            raise RequestError(
                swarm_pb2.Error.OVERLOADED,
                f"this node buffers at most {limit / 2**20:.0f} MiB of requests at once; try again later",
            )
        self.held += nbytes

    def close(self) -> None:
        """Give every byte back (idempotent)."""
        held, self.held = self.held, 0
        if held:
            self.admission._give_back(held)

    def __enter__(self) -> BufferedBytes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
