"""One compute thread per span, taking work by priority: inference steps first (a client waits on each
token), then forward and backward calls (training and fine-tuning), then verification work that nobody waits
on step by step (a spot check's trace of a whole prefix). Calls that say they batch with each other (decode
steps of different sessions on the same layers) run as one call when several of them wait at once."""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from swarm.verification.determinism import adopt_thread_count

INFERENCE = 0  # inference steps: a client waits on every token
SERVE = 1  # forward and backward calls (training, fine-tuning)
VERIFY = 2  # spot-check traces and dispute answers: they run when no request waits


@dataclass(frozen=True)
class Batchable:
    """Marks a call that may run together with other waiting calls of the same `key` (and priority):
    `run_many(list of their args)` returns one (ok, result or exception) per call, in order, so that one
    call's error fails only that call. At most `limit` calls go in one batch, oldest first.

    `expected` calls of its key are on their way (e.g. one decode step per active session): when fewer
    wait, the batch waits for the rest, up to `max_wait` seconds, rather than run as two half-batches
    that each pay the whole weight-reading cost."""

    key: Any
    run_many: Callable[[list[tuple]], Sequence[tuple[bool, Any]]]
    limit: int
    expected: int = 0
    max_wait: float = 0.0


class ComputeThread:
    """Runs submitted calls one at a time on its own thread: lowest priority value first, in submission
    order within a priority. A call that is running is never interrupted."""

    def __init__(self, name: str = "swarm-compute"):
        self._queue: list[tuple[int, int, Callable, tuple, concurrent.futures.Future, Batchable | None]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._shut = False
        self._busy = False  # a call runs: on this thread, or inline on a caller's (run_if_idle)
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(
        self, fn: Callable, *args: Any, priority: int = SERVE, batch: Batchable | None = None
    ) -> concurrent.futures.Future:
        """Queue `fn(*args)`; RuntimeError after shutdown. With `batch`, it may instead run through
        `batch.run_many` together with other waiting calls of the same key and priority."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._shut:
                raise RuntimeError("cannot schedule new work after shutdown")
            heapq.heappush(self._queue, (priority, next(self._order), fn, args, future, batch))
            self._wake.notify()
        return future

    def run_if_idle(self, fn: Callable, *args: Any) -> tuple[bool, Any]:
        """Run `fn(*args)` on the calling thread if nothing runs or waits here, holding off queued work
        until it returns: (True, result), or (False, None) and the caller submits instead. For calls
        shorter than the two thread switches (and GIL hand-offs) that `submit` costs, e.g. decode steps."""
        with self._wake:
            if self._shut or self._busy or self._queue:
                return False, None
            self._busy = True
        try:
            return True, fn(*args)
        finally:
            with self._wake:
                self._busy = False
                self._wake.notify_all()  # work queued meanwhile may start

    def _work(self) -> None:
        adopt_thread_count()  # a node's traces must round as its profile (and a referee) does
        while True:
            with self._wake:
                while not self._queue or self._busy:
                    if self._shut and not self._queue:
                        return
                    self._wake.wait()
                head = heapq.heappop(self._queue)
                self._busy = True
                self._gather(head)
                entries = self._take_batch(head)
            outcomes: list[tuple[concurrent.futures.Future, tuple[bool, Any]]] = []
            try:
                outcomes = self._run_entries(entries)
            finally:
                # idle before the callers hear back, so that the next call may run inline (run_if_idle)
                with self._wake:
                    self._busy = False
            for future, (ok, value) in outcomes:
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def _gather(self, head: tuple) -> None:
        """Wait (releasing the lock) until the calls `head`'s batch expects are queued, or its max_wait
        has passed. Called holding the lock, with the thread marked busy so nothing runs inline."""
        batch = head[5]
        if batch is None or batch.max_wait <= 0:
            return
        wanted = min(batch.limit, batch.expected) - 1
        deadline = time.monotonic() + batch.max_wait
        while not self._shut and len(self._mates(head)) < wanted:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.wait(remaining)

    def _mates(self, head: tuple) -> list[tuple]:
        """The waiting calls that may run in `head`'s batch (its key and priority), oldest first."""
        key = head[5].key
        return sorted(
            (e for e in self._queue if e[5] is not None and e[5].key == key and e[0] == head[0]),
            key=lambda e: e[1],
        )

    def _take_batch(self, head: tuple) -> list[tuple]:
        """`head` and, if it batches, the oldest waiting calls of its key and priority (up to its limit),
        taken off the queue. Called holding the lock."""
        batch = head[5]
        if batch is None or batch.limit <= 1:
            return [head]
        mates = self._mates(head)[: batch.limit - 1]
        if mates:
            taken = {id(e) for e in mates}
            self._queue = [e for e in self._queue if id(e) not in taken]
            heapq.heapify(self._queue)
        return [head, *mates]

    @staticmethod
    def _run_entries(entries: list[tuple]) -> list[tuple[concurrent.futures.Future, tuple[bool, Any]]]:
        """Run one call, or a batch through its run_many; calls whose callers gave up are dropped."""
        live = [e for e in entries if e[4].set_running_or_notify_cancel()]
        if not live:
            return []
        if len(live) == 1:
            *_, fn, args, future, _batch = live[0]
            try:
                return [(future, (True, fn(*args)))]
            except BaseException as e:
                return [(future, (False, e))]
        try:
            results = list(live[0][5].run_many([e[3] for e in live]))
            if len(results) != len(live):
                raise RuntimeError(f"a batch of {len(live)} calls returned {len(results)} results")
        except BaseException as e:
            results = [(False, e)] * len(live)
        return [(e[4], result) for e, result in zip(live, results, strict=True)]

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Take no more work; with `cancel_futures`, drop what is queued; with `wait`, let the rest finish."""
        with self._wake:
            self._shut = True
            if cancel_futures:
                for entry in self._queue:
                    entry[4].cancel()
                self._queue.clear()
            self._wake.notify_all()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()
