"""Nodes with quantized weights (`swarm node --quant int8`, bitsandbytes' LLM.int8()), real processes.

An int8 node's logits stay within RELATIVE_LOGIT_ERROR of local fp32 transformers (measured: about 0.005
on the tiny Llama, 0.045 on SmolLM2), its blocks take at most 0.35x of their fp32 bytes as measured by the
node from its loaded tensors (and announced, so `swarm health --json` shows them), and the built-in model
still answers the demo question. A client with allowed_quant=["none"] never routes through it, and says so
clearly when only quantized nodes serve a span. `--num-blocks auto` counts the quantized bytes.
"""

import json
import re
import subprocess

import pytest
import torch

from swarm.cli.main import main
from swarm.client import DistributedModelForCausalLM
from swarm.client.errors import QuantNotAllowedError
from swarm.local import LocalSwarm, run_cli

# ||logits - local fp32 logits|| / ||local fp32 logits|| (Frobenius norms over the whole prompt)
RELATIVE_LOGIT_ERROR = 0.1
MAX_INT8_BYTES_RATIO = 0.35  # of a block's fp32 bytes


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits - reference).norm() / reference.norm())


def fp32_block_bytes(local_model) -> int:
    return sum(p.nbytes for p in local_model.model.layers[0].parameters())


def swarm_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli(list(args), timeout=timeout)


def health_nodes(swarm: LocalSwarm, model: str) -> dict[str, dict]:
    result = swarm_cli("health", "--initial-peers", *swarm.initial_peers, "--model", model, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    return {node["peer_id"]: node for node in json.loads(result.stdout)["nodes"] if node["state"] == "ONLINE"}


@pytest.fixture(scope="module")
def mixed_swarm(tiny_model, tmp_path_factory):
    """The tiny Llama served twice, in full: by a float32 node and by an int8 node."""
    swarm = LocalSwarm(workdir=tmp_path_factory.mktemp("quant-swarm"))
    try:
        swarm.start_bootstrap()
        full = swarm.start_node(str(tiny_model), "0:6", "--throughput", "10", wait=False)
        int8 = swarm.start_node(str(tiny_model), "0:6", "--quant", "int8", "--throughput", "10", wait=False)
        swarm.wait_ready(full)
        swarm.wait_ready(int8)
        yield swarm, full, int8
    finally:
        swarm.close()


def test_int8_node_is_close_to_local_in_a_third_of_the_memory(mixed_swarm, tiny_model, local_model):
    swarm, full, int8 = mixed_swarm
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = local_model(ids).logits
    with DistributedModelForCausalLM.from_pretrained(
        str(tiny_model), swarm.initial_peers, allowed_quant=["int8"]
    ) as model:
        with torch.no_grad():
            logits = model(ids).logits
        with model.inference_session(max_length=20) as session:
            model.generate(ids[:1], max_new_tokens=4, session=session)
            assert [span.peer_id for span in session.route] == [int8.peer_id]
    error = relative_error(logits, reference)
    assert 0 < error < RELATIVE_LOGIT_ERROR  # not 0: the weights really are int8

    nodes = health_nodes(swarm, "tiny-llama")
    # measured by each node from its loaded tensors: the float32 node holds exactly the block's parameters
    assert nodes[full.peer_id]["quant"] == "none"
    assert nodes[full.peer_id]["bytes_per_block"] == fp32_block_bytes(local_model)
    assert nodes[int8.peer_id]["quant"] == "int8"
    assert 0 < nodes[int8.peer_id]["bytes_per_block"] <= MAX_INT8_BYTES_RATIO * fp32_block_bytes(local_model)
    # and each logs its peak memory once loaded
    for node in (full, int8):
        assert re.search(r"MiB per block; peak memory so far [0-9.]+ MiB \(resident set\)", node.log())


def test_allowed_quant_none_avoids_int8_nodes(mixed_swarm, tiny_model, local_model):
    swarm, full, int8 = mixed_swarm
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = local_model.generate(ids, max_new_tokens=6, do_sample=False)
    with DistributedModelForCausalLM.from_pretrained(
        str(tiny_model), swarm.initial_peers, allowed_quant=["none"]
    ) as model:
        for _ in range(3):  # each session routes afresh
            with model.inference_session(max_length=16) as session:
                out = model.generate(ids, max_new_tokens=6, do_sample=False, session=session)
                assert [span.peer_id for span in session.route] == [full.peer_id]
            assert torch.equal(out, expected)  # full precision: the exact local tokens
    # only the int8 node left to serve the blocks: a clear error, not a silent int8 route
    with DistributedModelForCausalLM.from_pretrained(
        str(tiny_model),
        swarm.initial_peers,
        allowed_quant=["none"],
        blocked_servers=[full.peer_id],
        wait_for_blocks=1.0,
    ) as model:
        with pytest.raises(QuantNotAllowedError, match=r"int8.*allowed_quant=\['none'\]"):
            model.generate(ids, max_new_tokens=2)


def test_num_blocks_auto_counts_quantized_bytes(tiny_model, local_swarm):
    """Blocks of 0.14 MiB in float32, 0.04 MiB in int8, plus 16 KiB of KV cache each at --cache-tokens 64:
    400 KiB holds 2 float32 blocks and all 6 int8 ones; 100 KiB not even one float32 block."""
    local_swarm.start_bootstrap()
    auto = ("--num-blocks", "auto", "--max-memory", "400KB", "--cache-tokens", "64", "--throughput", "10")
    full = local_swarm.start_node(str(tiny_model), None, *auto, "--model-name", "auto-full", wait=False)
    int8 = local_swarm.start_node(
        str(tiny_model), None, *auto, "--quant", "int8", "--model-name", "auto-int8", wait=False
    )
    local_swarm.wait_ready(full)
    local_swarm.wait_ready(int8)
    assert full.span[1] - full.span[0] == 2
    assert int8.span == (0, 6)
    assert "--num-blocks auto: 6 blocks fit in 0.4 MiB" in int8.log()

    result = swarm_cli(
        "node", "--model", str(tiny_model), "--num-blocks", "auto", "--max-memory", "100KB",
        "--cache-tokens", "64", "--initial-peers", *local_swarm.initial_peers,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--num-blocks auto: not even one block fits in 0.1 MiB" in result.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--blocks", "0:1", "--quant", "int4"), "argument --quant: invalid choice: 'int4'"),
        (("--num-blocks", "some"), "--num-blocks must be a positive number or 'auto', got 'some'"),
        (("--num-blocks", "auto", "--max-memory", "lots"), "--max-memory must look like 512MB"),
        (("--blocks", "0:1", "--max-memory", "1GB"), "--max-memory needs --num-blocks auto"),
        (("--train", "run.yaml", "--quant", "int8"), "--quant is for serving"),
    ],
)
def test_bad_quant_and_memory_flags_are_usage_errors(tiny_model, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error, before anything starts
        main(["node", "--model", str(tiny_model), *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(900)  # 30 int8 blocks on a loaded 2-core CPU: LLM.int8() is slower than fp32 there
def test_builtin_model_in_int8_answers_the_demo_question(builtin_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from swarm.models import load_tokenizer

    model_name = "smollm2-135m-instruct"
    tokenizer = load_tokenizer(model_name)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    local = AutoModelForCausalLM.from_pretrained(builtin_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = local(ids).logits
    with LocalSwarm(workdir=tmp_path / "swarm") as swarm:
        swarm.start_bootstrap()
        node = swarm.start_node(model_name, "0:30", "--quant", "int8", "--throughput", "10", timeout=300)
        with DistributedModelForCausalLM.from_pretrained(
            model_name, swarm.initial_peers, allowed_quant=["int8"]
        ) as model:
            with torch.no_grad():
                logits = model(ids).logits
            out = model.generate(ids, max_new_tokens=16, do_sample=False)
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        nodes = health_nodes(swarm, model_name)
    assert answer == "The capital of France is Paris."
    assert 0 < relative_error(logits, reference) < RELATIVE_LOGIT_ERROR
    assert nodes[node.peer_id]["quant"] == "int8"
    assert nodes[node.peer_id]["bytes_per_block"] <= MAX_INT8_BYTES_RATIO * fp32_block_bytes(local)
