"""One compute thread per span, taking work by priority: requests a client is waiting on go before
verification work that nobody waits on step by step (a spot check's trace of a whole prefix)."""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import threading
from collections.abc import Callable
from typing import Any

from swarm.verification.determinism import adopt_thread_count

SERVE = 0  # forward, backward and inference steps
VERIFY = 1  # spot-check traces and dispute answers: they run when no request waits


class ComputeThread:
    """Runs submitted calls one at a time on its own thread: lowest priority value first, in submission
    order within a priority. A call that is running is never interrupted."""

    def __init__(self, name: str = "swarm-compute"):
        self._queue: list[tuple[int, int, Callable, tuple, concurrent.futures.Future]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._shut = False
        self._busy = False  # a call runs: on this thread, or inline on a caller's (run_if_idle)
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args: Any, priority: int = SERVE) -> concurrent.futures.Future:
        """Queue `fn(*args)`; RuntimeError after shutdown."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._shut:
                raise RuntimeError("cannot schedule new work after shutdown")
            heapq.heappush(self._queue, (priority, next(self._order), fn, args, future))
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
                *_, fn, args, future = heapq.heappop(self._queue)
                self._busy = True
            outcome: tuple[bool, Any] | None = None
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        outcome = (True, fn(*args))
                    except BaseException as e:
                        outcome = (False, e)
            finally:
                # idle before the caller hears back, so that its next call may run inline (run_if_idle)
                with self._wake:
                    self._busy = False
            if outcome is not None:
                ok, value = outcome
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Take no more work; with `cancel_futures`, drop what is queued; with `wait`, let the rest finish."""
        with self._wake:
            self._shut = True
            if cancel_futures:
                for *_, future in self._queue:
                    future.cancel()
                self._queue.clear()
            self._wake.notify_all()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()
