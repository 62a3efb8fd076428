"""The built-in SmolLM2 split over 3 node processes: exact greedy text, and the user-facing commands."""

import os
import signal
import subprocess
import sys

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.client import DistributedModelForCausalLM
from swarm.local import LocalSwarm, run_cli, split_blocks
from swarm.models import load_tokenizer

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
QUESTION = "Write a short poem about the sea."


@pytest.fixture(scope="module")
def smol_swarm(builtin_cache, tmp_path_factory):
    swarm = LocalSwarm(workdir=tmp_path_factory.mktemp("smol-swarm"))
    try:
        swarm.start_bootstrap()
        swarm.start_nodes(MODEL, split_blocks(30, 3))
        yield swarm
    finally:
        swarm.close()


@pytest.fixture(scope="module")
def tokenizer(builtin_cache):
    return load_tokenizer(MODEL)


@pytest.fixture(scope="module")
def chat_ids(tokenizer):
    messages = [{"role": "user", "content": QUESTION}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]


@pytest.fixture(scope="module")
def expected(builtin_dir, chat_ids):
    local = AutoModelForCausalLM.from_pretrained(builtin_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return local.generate(chat_ids, max_new_tokens=40, do_sample=False)


def test_greedy_chat_equals_local_transformers(smol_swarm, chat_ids, expected, tokenizer):
    assert expected.shape[1] - chat_ids.shape[1] >= 32, "the prompt must yield at least 32 new tokens"
    with DistributedModelForCausalLM.from_pretrained(MODEL, smol_swarm.initial_peers) as model:
        out = model.generate(chat_ids, max_new_tokens=40, do_sample=False)
        assert torch.equal(out, expected), tokenizer.decode(out[0, chat_ids.shape[1] :])
        # the same text when the session is continued in chunks of 8, 16 and 16 tokens
        with model.inference_session(max_length=chat_ids.shape[1] + 40) as session:
            model.generate(chat_ids, max_new_tokens=8, session=session)
            model.generate(None, max_new_tokens=16, session=session)
            chunked = model.generate(None, max_new_tokens=16, session=session)
            assert [(s.start, s.end) for s in session.route] == [(0, 10), (10, 20), (20, 30)]
        assert torch.equal(chunked, expected)


def swarm_cli(*args, stdin=None, timeout=180):
    return run_cli(list(args), timeout=timeout, input=stdin)


def test_generate_cli_prints_only_the_completion(smol_swarm):
    result = swarm_cli(
        "generate",
        "--model",
        MODEL,
        "--initial-peers",
        *smol_swarm.initial_peers,
        "--prompt",
        "What is the capital of France?",
        "--chat",
        "--max-new-tokens",
        "16",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "The capital of France is Paris.\n"


def test_chat_cli_keeps_one_conversation(smol_swarm):
    result = swarm_cli(
        "chat",
        "--model",
        MODEL,
        "--initial-peers",
        *smol_swarm.initial_peers,
        "--max-new-tokens",
        "24",
        stdin="What is the capital of France?\nAnd of Germany?\n",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Paris" in result.stdout
    assert "Berlin" in result.stdout  # only answerable with the first turn in the session


def test_local_cli_prints_peers_and_stops_every_child_on_ctrl_c(tiny_model, tmp_path):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "swarm.cli.main",
            "local",
            "--model",
            str(tiny_model),
            "--nodes",
            "2",
            "--workdir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        lines = [process.stdout.readline() for _ in range(2)]
        assert lines[0].strip() == "model: tiny-llama"
        peers = lines[1].removeprefix("initial peers: ").split()
        assert peers and all("/p2p/" in peer for peer in peers)
        children = psutil.Process(process.pid).children(recursive=True)
        # a child forked from the fork server (swarm.local.forkserver) is named "swarm node"
        assert len([c for c in children if "node" in " ".join([c.name(), *c.cmdline()])]) >= 2
        with DistributedModelForCausalLM.from_pretrained(tiny_model, peers) as model:
            assert [(s.start, s.end) for s in model.find_route()] == [(0, 3), (3, 6)]
        os.kill(process.pid, signal.SIGINT)
        assert process.wait(60) == 0
        _, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"left behind: {alive}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def leftover_processes(marker: str) -> list[psutil.Process]:
    """Processes that inherited `marker` in their environment."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("SWARM_TEST_MARKER") == marker:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_demo_answers_and_shows_the_route(builtin_cache, tmp_path):
    marker = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "swarm.cli.main", "demo"],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "SWARM_TEST_MARKER": marker},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "Q: What is the capital of France?"
    assert lines[1] == "A: The capital of France is Paris."
    assert [line.split("node")[0].strip() for line in lines[3:6]] == [
        "blocks [ 0, 10)",
        "blocks [10, 20)",
        "blocks [20, 30)",
    ]
    assert "ms/token" in result.stdout
    assert not leftover_processes(marker)
