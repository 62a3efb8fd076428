"""Whole-message reads on the command pipes of hivemind's background processes.

hivemind's DHT and averager processes watch their command pipe with `loop.add_reader`, which leaves its
file descriptor non-blocking, then `recv()` as soon as `poll()` sees the first bytes. A message above 16
KiB is written in two pieces (multiprocessing sends the length, then the payload), so a reader can find
the length without the payload: `recv()` fails half-way with BlockingIOError, the stream loses its place,
and the next read kills the process ("Ran out of input"). Robust averaging sends messages that size (a
commitment, an accusation). `BlockingReads` makes each `recv()` wait for the rest of a message whose
first bytes have arrived: the writer is in the middle of sending it.
"""

from __future__ import annotations

import os
from multiprocessing.connection import Connection
from typing import Any


class BlockingReads:
    """Wraps a Connection: `recv()` runs in blocking mode; everything else is the Connection's."""

    def __init__(self, connection: Connection):
        self._connection = connection

    def recv(self) -> Any:
        os.set_blocking(self._connection.fileno(), True)
        return self._connection.recv()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)
