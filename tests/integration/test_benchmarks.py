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


TRAINING_KEYS = {
    "name",
    "model",
    "device",
    "device_name",
    "stages",
    "peers_per_stage",
    "trainers",
    "steps",
    "batch",
    "microbatch",
    "seq_len",
}


def test_training_benchmark_runs_at_the_smallest_size():
    result = run_benchmark(
        "benchmarks.training",
        "--steps",
        "1",
        "--hidden",
        "64",
        "--seq-len",
        "32",
        "--configs",
        "1x1",
        "--averaging-peers",
        "2",
        "--rounds",
        "1",
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["name"] for row in rows] == ["training", "averaging_round"]
    training, averaging = rows
    for row in rows:
        assert TRAINING_KEYS <= row.keys() and row["device"] == "cpu" and row["stages"] == 2
    assert (training["peers_per_stage"], training["trainers"], training["steps"]) == (1, 1, 1)
    # samples are the microbatches that finished inside the measured window; part of the first measured
    # step may have finished during the warm-up, so a one-step window can hold less than a batch
    assert training["seq_len"] == 32 and training["batch"] == 16
    assert training["samples"] >= training["microbatch"] and training["samples"] % training["microbatch"] == 0
    for key in ("swarm_samples_per_s", "local_samples_per_s", "ratio"):
        assert training[key] > 0, key
    assert {"mean_averaging_s_trainers", "mean_averaging_s_stages", "final_loss"} <= training.keys()
    assert averaging["peers_per_stage"] == [2] and averaging["numel"] > 0
    # a round may fail on a loaded machine: then it is counted, not timed
    assert averaging["failed_rounds"] == [1] or averaging["median_round_s"][0] > 0
