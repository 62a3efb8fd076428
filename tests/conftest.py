"""Shared fixtures: a tiny random Llama on disk, a private model cache, and local swarms of real processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from swarm.local import LocalSwarm
from swarm.models.tiny import write_tiny_llama

# transformers' deprecations must fail the suite where this project triggers them: a renamed keyword
# (`past_key_values` -> `cache`, removed in 5.40) from any caller (a layer call goes through torch's
# Module.__call__, so the warning names torch as its module), and any FutureWarning or DeprecationWarning
# attributed to swarm's own code. Node processes get the same rule through PYTHONWARNINGS where a test
# sets it (tests/integration/test_model_families.py).
DEPRECATIONS_AS_ERRORS = (
    r"error:`\w+` is deprecated:FutureWarning",
    "error::FutureWarning:swarm",
    "error::DeprecationWarning:swarm",
)


def pytest_configure(config):
    for line in DEPRECATIONS_AS_ERRORS:
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture(scope="session", autouse=True)
def swarm_cache(tmp_path_factory) -> Path:
    """Every process the tests start shares one cache folder (never the user's ~/.cache/swarm).

    SWARM_TEST_CACHE, when set, keeps converted built-in models between runs.
    """
    cache = Path(os.environ.get("SWARM_TEST_CACHE") or tmp_path_factory.mktemp("swarm-cache"))
    previous = os.environ.get("SWARM_CACHE")
    os.environ["SWARM_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield cache
    if previous is None:
        os.environ.pop("SWARM_CACHE", None)
    else:
        os.environ["SWARM_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 6-block random Llama (fp32 safetensors) named tiny-llama."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", num_blocks=6)


@pytest.fixture(scope="session")
def local_model(tiny_model):
    """The tiny Llama in plain transformers (fp32, frozen): the reference the swarm must match."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval().requires_grad_(False)


@pytest.fixture
def local_swarm(tmp_path):
    """A LocalSwarm whose processes are all reaped when the test ends, pass or fail."""
    swarm = LocalSwarm(workdir=tmp_path / "swarm")
    yield swarm
    swarm.close()


def start_nodes(swarm: LocalSwarm, model: str, spans: list[str], *extra: str):
    """Start several nodes at once (they load in parallel), then wait for each."""
    processes = [swarm.start_node(model, span, *extra, wait=False) for span in spans]
    for process in processes:
        swarm.wait_ready(process)
    return processes


@pytest.fixture(scope="session")
def tiny_swarm(tiny_model, tmp_path_factory):
    """A bootstrap peer and 3 nodes splitting the tiny Llama as [0, 2), [2, 5), [5, 6); shared, not killed."""
    swarm = LocalSwarm(workdir=tmp_path_factory.mktemp("tiny-swarm"))
    try:
        swarm.start_bootstrap()
        start_nodes(swarm, str(tiny_model), ["0:2", "2:5", "5:6"])
        yield swarm
    finally:
        swarm.close()


@pytest.fixture(scope="session")
def tiny_nodes(tiny_swarm):
    """The 3 nodes tiny_swarm started with, in span order: tests add (and stop) others beside them."""
    nodes = [p for p in tiny_swarm.processes[:4] if p.span is not None]
    assert [p.span for p in nodes] == [(0, 2), (2, 5), (5, 6)]
    return nodes


@pytest.fixture(scope="session")
def builtin_cache(swarm_cache) -> Path:
    """The session cache with the built-in model prepared (once; kept with SWARM_TEST_CACHE)."""
    from swarm.models.fetch import prepare_builtin

    prepare_builtin("smollm2-135m-instruct", cache_dir=swarm_cache, progress=False)
    return swarm_cache


@pytest.fixture(scope="session")
def builtin_dir(builtin_cache) -> Path:
    return builtin_cache / "models" / "smollm2-135m-instruct"
