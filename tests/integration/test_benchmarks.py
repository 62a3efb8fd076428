"""The benchmark scripts keep working on CPU-only machines: the GPU benchmark's whole path on a tiny
random Llama, and a clear refusal of CUDA where there is none."""

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

INFERENCE_KEYS = {"name", "model", "device", "dtype", "nodes", "local_tokens_per_s", "swarm_tokens_per_s"}


def run_benchmark(*args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


def test_gpu_benchmark_path_runs_on_cpu_with_a_tiny_random_llama(tmp_path):
    result = run_benchmark(
        "benchmarks.gpu",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--nodes",
        "1",
        "2",
        "--new-tokens",
        "4",
        "--batch",
        "2",
        "--seq",
        "16",
        "--repeats",
        "1",
        "--checkpoint-dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    inference = [row for row in rows if row["name"] == "inference"]
    forward = [row for row in rows if row["name"] == "forward"]
    assert [row["nodes"] for row in inference] == [1, 2] and [row["nodes"] for row in forward] == [1, 2]
    for row in inference + forward:
        assert INFERENCE_KEYS <= row.keys()
        assert row["model"] == "random-tiny" and row["device"] == "cpu"
        assert row["local_tokens_per_s"] > 0 and row["swarm_tokens_per_s"] > 0
    assert (tmp_path / "random-tiny" / "config.json").exists()  # kept for the next run


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without a GPU")
def test_gpu_benchmark_refuses_cuda_without_a_gpu():
    result = run_benchmark("benchmarks.gpu", "--nodes", "1", timeout=120)
    assert result.returncode == 2 and "--device cuda needs a GPU" in result.stderr
