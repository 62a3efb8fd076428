"""Small helpers the benchmark scripts share."""

from __future__ import annotations

import os
import platform
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def device_name(device: str) -> str:
    """What the numbers were measured on, for the JSON rows: the GPU's name, or the CPU and its cores."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def random_token_ids(checkpoint, batch: int, length: int) -> torch.Tensor:
    """The same seeded random prompt in every run, avoiding the lowest (special) token ids."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(10, checkpoint.config.vocab_size, (batch, length), generator=generator)


def release_memory(device: str) -> None:
    """Give cached GPU memory back after the local baseline, since the nodes share the GPU."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


CLIENT_THREADS = 1
"""torch threads of a benchmark's swarm client, which shares this machine's cores with the nodes it measures.
OpenMP threads spin for milliseconds after each parallel region (libgomp's default), so a 2-thread client
that waits on the network between tokens keeps a core busy that the nodes need: on 2 cores, 3 tiny-model
nodes ran 22-25 ms/token behind a 2-thread client and 15-17 behind a 1-thread one. The local baseline
keeps torch's own thread count."""


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch.set_num_threads(threads) inside the block, the previous count after (None: unchanged)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def start_split_swarm(swarm, model: str, num_blocks: int, nodes: int, device: str, dtype: str) -> None:
    """A bootstrap peer and `nodes` nodes that split the model's blocks evenly, on `device` in `dtype`."""
    from swarm.local import split_blocks

    swarm.start_bootstrap()
    swarm.start_nodes(model, split_blocks(num_blocks, nodes), "--dtype", dtype, "--device", device)


def run_until_sigterm(measure: Callable[..., Any], *args: Any) -> Any:
    """Run `measure(*args)` with SIGTERM unwinding like Ctrl-C, through the `finally`s that stop the
    processes and remove the folders it started (the previous handler is restored after)."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return measure(*args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)
