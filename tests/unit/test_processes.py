"""Local child processes: they don't spin OpenMP threads against each other, unless told to."""

import sys

import pytest

from swarm.local.processes import ManagedProcess

PRINT_POLICY = "import os; print('policy=' + os.environ['OMP_WAIT_POLICY'], flush=True)"


@pytest.mark.parametrize(("parent", "child"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_children_wait_passively_unless_the_environment_says_otherwise(tmp_path, monkeypatch, parent, child):
    if parent is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", parent)
    process = ManagedProcess("env", [sys.executable, "-c", PRINT_POLICY], tmp_path / "env.log")
    try:
        process.wait_for(rf"policy={child}\b", timeout=30)
    finally:
        process.kill()
