"""Every registered family served by real nodes equals local transformers on the same tiny checkpoint.

Per family: a tiny random model (3 blocks, hidden 64, GQA; a sliding window of 8 where the family has
one; 4 experts top-2 where it has them) split over 2 nodes as [0, 1) and [1, 3). Greedy generation is
token-identical and forward logits are within 1e-5 of `AutoModelForCausalLM`. For one full-attention,
one sliding-window and one MoE family, a backup node for [1, 3) takes over when the preferred one is
killed mid-generation (same text), and prompt-tuning gradients equal local autograd.
"""

import threading

import pytest
import torch
from prompt_helpers import PRE_SEQ_LEN, deep_prompts_of, local_logits, make_client
from transformers import AutoModelForCausalLM

from swarm.client import DistributedModelForCausalLM
from swarm.local import LocalSwarm
from swarm.models.families import SUPPORTED_MODEL_TYPES
from swarm.models.tiny import write_tiny_family

pytestmark = pytest.mark.slow

WITH_RECOVERY = ("llama", "gemma3_text", "qwen3_moe")  # full attention, sliding window, experts
PROMPT_LEN, NEW_TOKENS = 12, 16  # past the sliding window of 8
# a node that calls a layer by the name transformers renamed fails its request instead of warning
NODE_ENV = {"PYTHONWARNINGS": "error:`past_key_values` is deprecated:FutureWarning"}


@pytest.fixture(scope="module")
def bootstrap(tmp_path_factory):
    swarm = LocalSwarm(workdir=tmp_path_factory.mktemp("families"), env=NODE_ENV)
    try:
        swarm.start_bootstrap()
        yield swarm
    finally:
        swarm.close()


@pytest.fixture(scope="module", params=SUPPORTED_MODEL_TYPES)
def family(request, bootstrap, tmp_path_factory):
    """(model_type, checkpoint path, local reference model, {span: node}) with this family's nodes up;
    they are stopped before the next family starts."""
    model_type = request.param
    path = write_tiny_family(tmp_path_factory.mktemp("models") / f"tiny-{model_type}", model_type)
    spans = ["0:1", "1:3"] + (["1:3"] if model_type in WITH_RECOVERY else [])
    throughputs = ["100", "100", "1"]  # the backup of [1, 3) is routed to only when the preferred one dies
    pending = [
        bootstrap.start_node(str(path), span, "--throughput", rps, "--update-period", "2", wait=False)
        for span, rps in zip(spans, throughputs, strict=False)
    ]
    nodes = [bootstrap.wait_ready(process) for process in pending]
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    try:
        yield model_type, path, local, nodes
    finally:
        for node in nodes:
            node.kill()


def prompt(batch=1, length=PROMPT_LEN, seed=0):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_greedy_generation_and_logits_equal_local(family, bootstrap):
    model_type, path, local, _ = family
    input_ids = prompt(batch=2, seed=1)
    with torch.no_grad():
        expected = local.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        expected_logits = local(input_ids).logits
    with DistributedModelForCausalLM.from_pretrained(path, bootstrap.initial_peers) as client:
        out = client.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        with torch.no_grad():
            logits = client(input_ids).logits
    assert torch.equal(out, expected), model_type
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", WITH_RECOVERY, indirect=True)
def test_node_killed_mid_generation_gives_the_same_text(family, bootstrap):
    model_type, path, local, nodes = family
    input_ids = prompt(seed=2)
    with torch.no_grad():
        expected = local.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    with DistributedModelForCausalLM.from_pretrained(
        path, bootstrap.initial_peers, request_timeout=20, max_retries=5
    ) as client:
        client.client_config.max_step_tokens = 4
        with client.inference_session(max_length=PROMPT_LEN + NEW_TOKENS) as session:
            killed = threading.Event()

            def on_step(position):
                if position >= PROMPT_LEN + NEW_TOKENS // 2 and not killed.is_set():
                    killed.set()  # whichever [1, 3) node the route took (the preferred one, by throughput)
                    serving = {span.peer_id for span in session.route if span.start == 1}
                    next(node for node in nodes[1:] if node.peer_id in serving).kill()

            session.on_step = on_step
            out = client.generate(input_ids, max_new_tokens=NEW_TOKENS, session=session)
            assert killed.is_set() and session.num_recoveries == 1
    assert torch.equal(out, expected), model_type


@pytest.mark.parametrize("family", WITH_RECOVERY, indirect=True)
def test_prompt_tuning_gradients_equal_local(family, bootstrap):
    _, path, local, _ = family
    with make_client(path, bootstrap, "deep_ptune") as model:
        input_ids = prompt(batch=3, length=9, seed=3)
        logits = model(input_ids).logits
        logits.log_softmax(-1)[..., 7].mean().backward()
        prompts = model.prompt_embeddings.weight.detach().clone().requires_grad_(True)
        deep = deep_prompts_of(model).detach().clone().requires_grad_(True)
        expected = local_logits(local, input_ids, prompts, deep)
        expected.log_softmax(-1)[..., 7].mean().backward()
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.prompt_embeddings.weight.grad, prompts.grad, rtol=0, atol=1e-5)
        grad = model.intermediate_prompt_embeddings.weight.grad
        grad = grad.view(PRE_SEQ_LEN, model.num_blocks, -1).permute(1, 0, 2)
        torch.testing.assert_close(grad, deep.grad, rtol=0, atol=1e-5)
        assert prompts.grad.abs().sum() > 0 and deep.grad[0].abs().sum() > 0
