"""Every command fails the same way: one line and a hint on stderr, exit 1; usage errors exit 2."""

from __future__ import annotations

import subprocess

import pytest

from swarm.local import run_cli

MISSING = "/nonexistent/swarm-test/model"

# a failing invocation of each command that fails before it would reach the network
FAILURES = {
    "node": ["node", "--model", MISSING, "--blocks", "0:1"],
    "generate": ["generate", "--model", MISSING, "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--prompt", "x"],
    "chat": ["chat", "--model", MISSING, "--initial-peers", "/ip4/127.0.0.1/tcp/1"],
    "local": ["local", "--model", MISSING, "--nodes", "1"],
    "models fetch": ["models", "fetch", "no-such-model"],
    "gateway": [
        "gateway",
        "--model",
        MISSING,
        "--initial-peers",
        "/ip4/127.0.0.1/tcp/1",
        "--wait-for-blocks",
        "-1",
    ],
    "api": ["api", "--model", MISSING, "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--wait-for-blocks", "-1"],
}


USAGE_ERRORS = [
    ["node", "--model", MISSING, "--blocks", "0:1", "--no-such-flag"],
    ["node", "--model", MISSING],  # no --blocks, --num-blocks or --train
    ["generate", "--no-such-flag"],
    ["run", "status", "--run", f"{MISSING}.toml"],  # a run file that is not there
    ["train", "--run", f"{MISSING}.toml", "--data", MISSING, "--initial-peers", "/ip4/127.0.0.1/tcp/1"],
    ["health", "--no-such-flag"],
    ["local", "--nodes", "x"],
]


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """Every invocation below, each a `swarm` process of its own (forked: no seconds of imports each)."""
    invocations = [tuple(args) for args in [*FAILURES.values(), *USAGE_ERRORS]]
    return {args: run_cli(list(args), timeout=180) for args in invocations}


@pytest.mark.parametrize("command", sorted(FAILURES))
def test_a_failure_is_one_line_and_a_hint(command, results):
    result = results[tuple(FAILURES[command])]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in lines if line.startswith("swarm ")]
    assert len(errors) == 1 and ": error: " in errors[0], lines
    assert lines[-1].startswith("hint: "), lines


@pytest.mark.parametrize("args", USAGE_ERRORS)
def test_a_usage_error_exits_2(args, results):
    result = results[tuple(args)]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and ": error: " in result.stderr
