"""Server-side inference sessions: a KV cache per session, within a per-node budget counted in bytes."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from swarm.node.errors import RequestError
from swarm.node.kv_cache import SpanCache
from swarm.proto import swarm_pb2
from swarm.utils.tensors import deserialize_checked


@dataclass
class Session:
    """One client's inference state on this node."""

    session_id: str
    start: int
    end: int
    layers: slice
    max_length: int
    batch_size: int = 0  # fixed by the first step
    reserved_bytes: int = 0  # the KV cache preallocated for batch x max_length
    length: int = 0  # tokens held in the cache
    cache: SpanCache | None = None
    last_active: float = field(default_factory=time.monotonic)
    owner: str = ""  # the peer that opened it: ids are the owner's, another peer's may be the same
    computing: bool = False  # a step is running on the compute thread
    closed: bool = False  # released: no step may start; one still computing frees the cache when done
    inbox: Any = None  # its stream's StepInbox when its client lets other nodes push steps (swarm.node.push)
    # (step id, position, length after, reply) of the last step run: a client that resends a step the previous
    # node already pushed here gets this reply again, not a second run (a beam reorder must apply once)
    last_step: tuple[int, int, int, Any] | None = None


class SessionBudget:
    """Counts the KV-cache bytes that open sessions preallocate (batch x max_length x bytes per token of the
    layers each one uses) against the node's budget. The budget is set as `--cache-tokens` tokens over the
    whole span; a session over fewer layers takes fewer bytes."""

    def __init__(self, max_tokens: int, bytes_per_token: int = 1):
        self.bytes_per_token = bytes_per_token  # one token of one sequence over the whole span
        self.max_bytes = max_tokens * bytes_per_token
        self._reserved = 0
        self._sessions: dict[tuple[str, str], Session] = {}
        self._lock = threading.Lock()

    @property
    def max_tokens(self) -> int:
        return self.max_bytes // self.bytes_per_token

    @property
    def bytes_left(self) -> int:
        with self._lock:
            return self.max_bytes - self._reserved

    @property
    def tokens_left(self) -> int:
        """Whole-span tokens that still fit (what ServerInfo.cache_tokens_left announces)."""
        return self.bytes_left // self.bytes_per_token

    @property
    def num_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def register(self, session: Session) -> None:
        with self._lock:
            key = (session.owner, session.session_id)
            if key in self._sessions:
                raise RequestError(
                    swarm_pb2.Error.BAD_REQUEST, f"session {session.session_id!r} is already open here"
                )
            self._sessions[key] = session

    def find(self, owner: str, session_id: str) -> Session | None:
        """The open session `owner` opened as `session_id`, if any."""
        with self._lock:
            return self._sessions.get((owner, session_id))

    def reserve(self, session: Session, batch_size: int, token_bytes: int | None = None) -> None:
        """Reserve the session's whole cache (batch x max_length tokens of `token_bytes` each, by default
        the whole span's) before it is allocated, or refuse at once so the client can go elsewhere."""
        token_bytes = self.bytes_per_token if token_bytes is None else token_bytes
        nbytes = batch_size * session.max_length * token_bytes
        with self._lock:
            left = self.max_bytes - self._reserved
            if nbytes > left:
                raise RequestError(
                    swarm_pb2.Error.OVERLOADED,
                    f"KV cache is full: the session needs {nbytes} bytes "
                    f"(batch {batch_size} x max_length {session.max_length} x {token_bytes} bytes a token), "
                    f"{left} of {self.max_bytes} bytes left",
                )
            self._reserved += nbytes
            session.reserved_bytes, session.batch_size = nbytes, batch_size

    def release(self, session: Session) -> None:
        """Close a session and free its cache, or, while a step still computes into the cache (its
        request timed out), once that step ends: its tokens stay reserved until then."""
        with self._lock:
            session.closed = True
            if session.computing:
                return
            self._free(session)

    def _free(self, session: Session) -> None:
        key = (session.owner, session.session_id)
        if self._sessions.get(key) is session:
            del self._sessions[key]
            self._reserved -= session.reserved_bytes
            session.reserved_bytes = 0
        session.cache = None

    @contextlib.contextmanager
    def computing(self, session: Session) -> Iterator[None]:
        """Around a step on the compute thread: a closed session gets no step, and one closed meanwhile
        is freed when the step ends."""
        with self._lock:
            if session.closed:
                raise RequestError(swarm_pb2.Error.BAD_REQUEST, f"session {session.session_id!r} is closed")
            session.computing = True
        try:
            yield
        finally:
            with self._lock:
                session.computing = False
                if session.closed:
                    self._free(session)


def check_step_shapes(
    session: Session, position: int, hidden: torch.Tensor, mask: torch.Tensor | None, positions
) -> None:
    """A step must continue the session (or rewind it) and stay within its max_length."""
    batch, new_tokens, _ = hidden.shape
    if session.batch_size and batch != session.batch_size:
        raise RequestError(
            swarm_pb2.Error.BAD_REQUEST, f"batch size {batch} differs from the session's {session.batch_size}"
        )
    if position > session.length:
        raise RequestError(
            swarm_pb2.Error.BAD_REQUEST,
            f"step starts at position {position} but the session holds only {session.length} tokens",
        )
    if position + new_tokens > session.max_length:
        raise RequestError(
            swarm_pb2.Error.TOO_LARGE,
            f"step would reach {position + new_tokens} tokens, "
            f"past the session's max_length {session.max_length}",
        )
    if mask is not None and tuple(mask.shape) != (batch, position + new_tokens):
        raise RequestError(
            swarm_pb2.Error.BAD_REQUEST,
            f"attention_mask has shape {tuple(mask.shape)}, expected {(batch, position + new_tokens)}",
        )
    if positions is not None and tuple(positions.shape) != (batch, new_tokens):
        raise RequestError(
            swarm_pb2.Error.BAD_REQUEST,
            f"position_ids has shape {tuple(positions.shape)}, expected {(batch, new_tokens)}",
        )


def parse_hypo_ids(proto, position: int, batch: int, max_bytes: int) -> torch.Tensor:
    """A step's beam reordering: (batch,) integers in [0, batch), for a step after the first."""
    hypo_ids = deserialize_checked(
        proto,
        name="hypo_ids",
        allowed_dtypes={"int64": torch.int64, "int32": torch.int32},
        ndim=1,
        max_bytes=max_bytes,
    ).long()
    if tuple(hypo_ids.shape) != (batch,) or (hypo_ids < 0).any() or (hypo_ids >= batch).any():
        raise RequestError(
            swarm_pb2.Error.BAD_REQUEST,
            f"hypo_ids must be {batch} row indices in [0, {batch}), got shape {tuple(hypo_ids.shape)}",
        )
    if position == 0:
        raise RequestError(swarm_pb2.Error.BAD_REQUEST, "hypo_ids reorder the cache: not with the first step")
    return hypo_ids
