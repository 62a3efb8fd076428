"""The churn soak's CI version: 30 s of a node SIGKILLed every 6 s under 2 generating clients."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_half_a_minute_of_churn_loses_no_generation(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--duration", "30", "--kill-every", "6"],
        capture_output=True,
        text=True,
        timeout=280,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stderr[-3000:]
    row = json.loads(lines[-1])
    print(row)
    assert row["failed"] == 0 and row["differed"] == 0, row["errors"]
    assert row["generations"] >= 4 and row["kills"] >= 4 and row["joins"] == row["kills"], row
    assert result.returncode == 0
