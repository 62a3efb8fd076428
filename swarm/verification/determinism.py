"""Settings that make a forward pass bit-reproducible, and the profile two parties must share to be compared.

Refereed verification compares hashes of exact bytes, so two honest parties only agree when they run the
same kernels in the same order. On CPU in fp32 that means a fixed thread count and deterministic
algorithms; on CUDA also no TF32 and no autotuned cuDNN kernels. Even then, results only match between
machines with the same profile (dtype, device class, library versions), so a dispute is only fair between
parties whose profiles are equal.
"""

from __future__ import annotations

import functools
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import transformers


def apply_deterministic_profile(threads: int = 1) -> None:
    """Pin this process to bit-reproducible kernels: `threads` CPU threads, deterministic algorithms, no TF32.

    MKL_DYNAMIC and OMP_DYNAMIC are set to FALSE in os.environ too, but MKL and OpenMP read them when they
    start, so they only take effect in processes started after this call (set them before launching a node
    to cover the node itself).
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    os.environ["MKL_DYNAMIC"] = "FALSE"
    os.environ["OMP_DYNAMIC"] = "FALSE"
    torch.set_num_threads(threads)
    # warn_only: an op without a deterministic kernel should be visible in logs, not crash a node
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def adopt_thread_count() -> None:
    """Make the calling thread run its kernels with the process's thread count (torch.set_num_threads).

    Call it first in every thread that computes what must be bit-reproducible. torch.set_num_threads pins
    the thread that calls it, and other threads only read the setting when they first enter ATen's parallel
    code: until then MKL runs their GEMMs on every core, which rounds some shapes differently (a new
    thread's q_proj of 9 tokens of the tiny model differed from the pinning thread's by one ulp, and a spot
    check convicted an honest node for it).
    """
    torch.set_num_threads(torch.get_num_threads())


_PROFILE_LOCK = threading.RLock()


@contextmanager
def deterministic_profile(threads: int = 1) -> Iterator[None]:
    """Run a block of code under the deterministic profile (a referee recomputing an operator bit for bit
    inside a process that otherwise keeps its own settings), restoring torch's settings on exit.

    The settings are process-wide: other threads wait for the block to end (nesting in one thread is fine).
    """
    with _PROFILE_LOCK:
        yield from _under_profile(threads)


def _under_profile(threads: int) -> Iterator[None]:
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    env = {name: os.environ.get(name) for name in ("MKL_DYNAMIC", "OMP_DYNAMIC")}
    apply_deterministic_profile(threads=threads)
    try:
        yield
    finally:
        num_threads, enabled, warn_only, cudnn_deterministic, benchmark, matmul_tf32, cudnn_tf32 = saved
        torch.set_num_threads(num_threads)
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_deterministic, benchmark
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def device_class(device: str | torch.device) -> str:
    """What decides which kernels run: "cpu:<arch>:<ISA>" or "cuda:sm_<major><minor>:<GPU name>"."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:sm_{major}{minor}:{torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        # the vector ISA picks different kernels (and so different rounding) on the same architecture
        return f"cpu:{platform.machine()}:{torch.backends.cpu.get_cpu_capability()}"
    return device.type


ATTENTION = "sdpa"
"""The attention implementation swarm runs (swarm.models.checkpoint.load_config sets it; a deterministic node
pins it): eager and sdpa round differently, so it is part of the profile."""


def determinism_profile(
    dtype: str | torch.dtype, device: str | torch.device, attention: str = ATTENTION, quant: str = "none"
) -> dict[str, str]:
    """A flat description of everything that must match for two runs to be bit-identical.

    Read in the process that computes: threads and the deterministic flag are this process's settings.
    `quant` (the node's --quant) is part of it: an int8 or nf4 node computes other numbers than a
    full-precision one, by design, so it is only ever compared bit for bit with nodes of its own kind.
    """
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "quant": quant,
        "device": device_class(device),
        "attention": attention,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": str(torch.get_num_threads()),
        "deterministic": str(torch.are_deterministic_algorithms_enabled()),
        "tf32": str(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32),
    }


def same_profile(a: dict[str, str], b: dict[str, str]) -> bool:
    """Whether two parties' results can be compared bit for bit (every field equal, none missing)."""
    return a == b


def server_profile(info) -> dict[str, str]:
    """The profile a node announces in its ServerInfo (`determinism`); empty if it announces none."""
    return dict(info.determinism)


def is_deterministic(profile: dict[str, str]) -> bool:
    """Whether whoever computed `profile` pinned bit-reproducible kernels (apply_deterministic_profile).

    Two parties' results are comparable bit for bit only when both are, and same_profile(a, b) holds.
    """
    return profile.get("deterministic") == "True"


@functools.cache
def referee_profile() -> dict[str, str]:
    """The profile a referee in this process recomputes operators with: fp32 on this CPU, deterministic.
    Only verdicts settled under the same profile can be re-checked here."""
    with deterministic_profile():
        return determinism_profile(torch.float32, "cpu")
