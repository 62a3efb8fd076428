"""The event loops the project owns: a node's or gateway's main loop (uvloop's on request), and a private
loop in a daemon thread (the client's public API is synchronous, its core async)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

EVENT_LOOP_ENV = "SWARM_EVENT_LOOP"  # "uvloop": a node's or gateway's process runs uvloop's loop


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A loop for a process the project owns (a node, the gateway): asyncio's, or uvloop's when
    $SWARM_EVENT_LOOP is "uvloop" and it is installed. uvloop was not faster here: 3 tiny nodes and the
    gateway, 9 alternating runs each, per-token latency 6.88 vs 7.44 ms by medians but slower in 6 of 9
    pairs (benchmarks/results/event-loop-cpu-tiny.jsonl); a hop's cost is the P2P daemons', not the loop's.
    The client's loop is always asyncio's: it lives in the user's process."""
    if os.environ.get(EVENT_LOOP_ENV, "asyncio") == "uvloop":
        try:
            import uvloop
        except ImportError:
            logging.getLogger(__name__).warning("%s=uvloop but uvloop is not installed", EVENT_LOOP_ENV)
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(coro)` on a loop from `new_event_loop`."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)


class BackgroundLoop:
    """Runs coroutines on one event loop owned by a daemon thread."""

    def __init__(self, name: str = "swarm-client-loop"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result (cancelling it on timeout)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start a coroutine on the loop without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()
