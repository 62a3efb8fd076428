"""Compute threads of a span, taking work by priority: requests a client is waiting on go before
verification work that nobody waits on step by step (a spot check's trace of a whole prefix).

A frozen span runs its verification work on a second thread at the lowest CPU priority (`nice`), so a
trace never holds up a step that arrives while it runs, and takes only the CPU that serving leaves idle."""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

SERVE = 0  # forward, backward and inference steps
VERIFY = 1  # spot-check traces and dispute answers: they run when no request waits
LOWEST_CPU_PRIORITY = 19  # the nice value of verification threads

logger = logging.getLogger(__name__)


class ComputeThread:
    """Runs submitted calls one at a time on its own thread: lowest priority value first, in submission
    order within a priority. A call that is running is never interrupted.

    :param nice: the thread's nice value on Linux (0 keeps the process's); raising it needs no privilege
    """

    def __init__(self, name: str = "swarm-compute", nice: int = 0):
        self.nice = nice
        self._queue: list[tuple[int, int, Callable, tuple, concurrent.futures.Future]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._shut = False
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

    def _work(self) -> None:
        if self.nice:
            try:  # Linux gives each thread its own nice value; threads it starts inherit it
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
            except (AttributeError, OSError) as e:
                logger.info("could not lower the priority of %s: %r", self._thread.name, e)
        while True:
            with self._wake:
                while not self._queue and not self._shut:
                    self._wake.wait()
                if not self._queue:
                    return
                *_, fn, args, future = heapq.heappop(self._queue)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as e:
                future.set_exception(e)
            else:
                future.set_result(result)

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
