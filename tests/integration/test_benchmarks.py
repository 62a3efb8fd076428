"""The benchmark scripts keep working on CPU-only machines: the GPU benchmark's whole path on a tiny
random Llama, and a clear refusal of CUDA where there is none."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from swarm.models.tiny import write_tiny_tokenizer

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
        "2",  # one swarm of 2 nodes: the path a 1-node swarm takes is a part of it
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
    assert [row["nodes"] for row in inference] == [2] and [row["nodes"] for row in forward] == [2]
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


def test_byzantine_benchmark_quick_mode_bans_protocol_attackers_and_contains_sign_flip():
    result = run_benchmark("benchmarks.byzantine", "--quick", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    training = {(r["aggregator"], r["attack"]): r for r in rows if r["name"] == "byzantine_training"}
    (timing,) = [r for r in rows if r["name"] == "byzantine_round"]
    assert all(r["benchmark"] == "byzantine" for r in rows)
    attacks = ("none", "sign_flip", "equivocate", "bad_reducer")
    assert sorted(training) == sorted((a, b) for a in ("centered_clip", "mean") for b in attacks)
    for row in training.values():
        assert row["honest_banned"] == 0, row
        assert row["peers"] == 16 and row["chunks"] >= 32
        assert row["attackers"] == (0 if row["attack"] == "none" else 3)
    # the commitments catch an equivocating sender, the projection check a bad reducer: all banned at once
    for attack in ("equivocate", "bad_reducer"):
        row = training["centered_clip", attack]
        assert row["attackers_banned"] == 3 and row["rounds_to_ban_all"] <= 2, row
        assert row["final_loss"] is not None and row["loss_ratio"] < 1.2, row
    # gradient attacks are only contained: nobody is banned, and nobody honest either
    clipped, averaged = training["centered_clip", "sign_flip"], training["mean", "sign_flip"]
    assert clipped["attackers_banned"] == 0 and clipped["rounds_to_ban_all"] is None
    assert clipped["final_loss"] is not None and clipped["loss_ratio"] < 2.0, clipped
    assert training["centered_clip", "none"]["final_loss"] < 1.5 * training["mean", "none"]["final_loss"]
    # the plain mean is wrecked by the same attack (it diverges, or ends far above the honest loss)
    assert averaged["final_loss"] is None or averaged["loss_ratio"] > 3.0, averaged
    assert averaged["attackers_banned"] is None  # no checks, no bans
    # real hivemind peers: a round may fail on a loaded machine, then it is counted as null, not timed
    assert timing["peers"] == 2 and timing["floats"] == 100_000
    assert timing["robust_round_s"] is None or timing["robust_round_s"] > 0
    assert timing["plain_round_s"] is None or timing["plain_round_s"] > 0
    assert timing["accusations_filed"] == 0  # every peer is honest


def test_verification_benchmark_quick_mode_measures_checks_and_convicts_the_cheater(tiny_model):
    result = run_benchmark("benchmarks.verification", "--model", str(tiny_model), "--quick", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(next(iter(row)) == "name" for row in rows)
    generation = {row["verify_rate"]: row for row in rows if row["name"] == "verification_generation"}
    (profile,) = [row for row in rows if row["name"] == "deterministic_profile"]
    (dispute,) = [row for row in rows if row["name"] == "verification_dispute"]
    (caught,) = [row for row in rows if row["name"] == "verification_generation_dispute"]
    assert sorted(generation) == [0.0, 0.1, 1.0]
    for row in generation.values():
        assert row["model"] == "tiny-llama" and row["new_tokens"] == 4 and row["repeats"] == 1
        assert 0 < row["ms_per_token_median"] <= row["ms_per_token_p90"] and row["ratio_to_rate_0"] > 0
        assert row["convicted"] == [] and row["text_identical_across_rates"], row
        assert set(row["outcomes"]) <= {"agreed"} and sum(row["outcomes"].values()) == row["spot_checks"]
    assert generation[0.0]["spot_checks"] == 0 and generation[0.0]["ratio_to_rate_0"] == 1.0
    assert generation[1.0]["spot_checks"] == 2 * 4  # every step of both spans, prefill included
    assert {"goal_ratio", "goal_met_median", "goal_met_mean"} <= generation[0.1].keys()
    assert (
        profile["deterministic_ms_per_token_median"] > 0
        and profile["nondeterministic_ms_per_token_median"] > 0
    )
    # the one-ulp liar in block 4's down_proj (the default: the middle of the last span, [3, 6))
    assert dispute["cheater_convicted"] and dispute["reasons"] == {"b": "wrong_output"}
    assert (dispute["convicted_block"], dispute["convicted_op"]) == (4, "down_proj")
    assert dispute["rounds"] > 0 and 0 < dispute["bytes_moved"] < 64 * 1024 and dispute["seconds"] > 0
    assert dispute["wire_bytes_total"] > 0 and dispute["prompt_tokens"] == 8
    assert caught["cheater_convicted"] and caught["convicted"] == [caught["cheater"]]
    assert (caught["convicted_block"], caught["convicted_op"]) == (4, "down_proj")
    assert caught["text_equals_honest"] and caught["seconds"] > 0


def test_gateway_benchmark_compares_the_gateway_with_the_python_client(tiny_model):
    result = run_benchmark(
        "benchmarks.gateway",
        "--model",
        str(tiny_model),
        "--nodes",
        "1",
        "--new-tokens",
        "6",
        "--repeats",
        "1",
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["name"] == "gateway" and row["model"] == "tiny-llama" and row["new_tokens"] == 6
    assert row["python_ms_per_token"] > 0 and row["gateway_ms_per_token"] > 0 and row["ratio"] > 0
    difference = row["gateway_ms_per_token"] - row["python_ms_per_token"]
    assert row["overhead_ms_per_token"] == pytest.approx(difference, abs=0.011)  # each figure rounded to 0.01


def test_openai_api_benchmark_compares_the_api_with_the_python_client(tiny_model, tmp_path):
    folder = tmp_path / tiny_model.name
    shutil.copytree(tiny_model, folder)
    write_tiny_tokenizer(folder)
    result = run_benchmark(
        "benchmarks.openai_api",
        "--model",
        str(folder),
        "--nodes",
        "1",
        "--new-tokens",
        "6",
        "--repeats",
        "1",
        "--concurrent",
        "2",
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["name"] == "openai_api" and row["model"] == "tiny-llama" and row["new_tokens"] == 6
    assert row["python_ms_per_token"] > 0 and row["api_ms_per_token"] > 0 and row["ratio"] > 0
    assert row["tokens_per_s_1_stream"] > 0 and row["tokens_per_s_2_streams"] > 0
    difference = row["api_ms_per_token"] - row["python_ms_per_token"]
    assert row["overhead_ms_per_token"] == pytest.approx(difference, abs=0.011)  # each figure rounded to 0.01


def test_concurrency_benchmark_compares_batched_and_unbatched_nodes(tiny_model):
    result = run_benchmark(
        "benchmarks.concurrency",
        *("--model", str(tiny_model), "--clients", "1", "3", "--new-tokens", "4", "--repeats", "1"),
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    runs = [row for row in rows if row["name"] == "concurrency"]
    assert [(row["batching"], row["clients"]) for row in runs] == [
        ("off", 1),
        ("off", 3),
        ("on", 1),
        ("on", 3),
    ]
    assert all(row["tokens_match"] and row["aggregate_tokens_per_s"] > 0 for row in runs)
    assert all(row["client_torch_threads"] == 1 for row in runs)  # the default: see CLIENT_THREADS
    (compute,) = [row for row in rows if row["name"] == "concurrency_node_compute"]
    assert compute["sessions"] == 3 and compute["alone_ms_per_token"] > 0 and compute["ratio"] > 0
    (gain,) = [row for row in rows if row["name"] == "concurrency_gain"]
    assert gain["clients"] == 3 and gain["batched_vs_one_unbatched"] > 0
