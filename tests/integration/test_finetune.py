"""Prompt tuning through the swarm: logits and prompt gradients equal local autograd; training works."""

import pytest
import torch
from prompt_helpers import PRE_SEQ_LEN, deep_prompts_of, local_logits, make_client

from swarm.local import LocalSwarm


@pytest.mark.parametrize(("mode", "chunk_rows"), [("ptune", None), ("deep_ptune", None), ("deep_ptune", 2)])
def test_logits_and_prompt_gradients_equal_local_autograd(
    tiny_model, tiny_swarm, local_model, mode, chunk_rows
):
    # chunk_rows=2: the 5 rows go as 3 micro-batches that pipeline through the spans
    with make_client(tiny_model, tiny_swarm, mode, max_chunk_rows=chunk_rows) as model:
        trainable = [p for p in model.parameters() if p.requires_grad]
        expected_params = [model.prompt_embeddings.weight]
        if mode == "deep_ptune":
            expected_params.append(model.intermediate_prompt_embeddings.weight)
        assert {id(p) for p in trainable} == {id(p) for p in expected_params}

        input_ids = torch.randint(3, 256, (5, 9), generator=torch.Generator().manual_seed(1))
        attention_mask = torch.ones_like(input_ids)
        attention_mask[2, :2] = 0
        logits = model(input_ids, attention_mask=attention_mask).logits
        assert logits.shape == (5, 9, 256)
        loss = logits.log_softmax(-1)[..., 7].mean()
        loss.backward()

        prompts = model.prompt_embeddings.weight.detach().clone().requires_grad_(True)
        deep = deep_prompts_of(model).detach().clone().requires_grad_(True) if mode == "deep_ptune" else None
        expected = local_logits(local_model, input_ids, prompts, deep, attention_mask)
        expected.log_softmax(-1)[..., 7].mean().backward()
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.prompt_embeddings.weight.grad, prompts.grad, rtol=0, atol=1e-5)
        assert prompts.grad.abs().sum() > 0
        if mode == "deep_ptune":
            grad = model.intermediate_prompt_embeddings.weight.grad
            grad = grad.view(PRE_SEQ_LEN, model.num_blocks, -1).permute(1, 0, 2)
            torch.testing.assert_close(grad, deep.grad, rtol=0, atol=1e-5)
            assert deep.grad[-1].abs().sum() > 0 and deep.grad[0].abs().sum() > 0


def toy_batch(seed):
    """The task: whatever the input, the next token is 42."""
    input_ids = torch.randint(3, 256, (8, 6), generator=torch.Generator().manual_seed(seed))
    return input_ids, torch.full((8,), 42)


def train(params, logits_fn, steps=12):
    optimizer = torch.optim.Adam(params, lr=0.2)
    losses = []
    for step in range(steps):
        input_ids, targets = toy_batch(step % 3)
        loss = torch.nn.functional.cross_entropy(logits_fn(input_ids)[:, -1], targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_training_lowers_the_loss_as_much_as_locally(tiny_model, tiny_swarm, local_model):
    with make_client(tiny_model, tiny_swarm, "ptune", seed=3) as model:
        local_prompts = model.prompt_embeddings.weight.detach().clone().requires_grad_(True)
        swarm_losses = train([model.prompt_embeddings.weight], lambda ids: model(ids).logits)
    local_losses = train([local_prompts], lambda ids: local_logits(local_model, ids, local_prompts))
    assert swarm_losses[-1] < 0.7 * swarm_losses[0], swarm_losses
    assert swarm_losses == pytest.approx(local_losses, rel=1e-3, abs=1e-4)


@pytest.mark.slow
def test_node_killed_between_forward_and_backward(tiny_model, local_model, tmp_path):
    with LocalSwarm(workdir=tmp_path / "swarm") as swarm:
        swarm.start_bootstrap()
        preferred = swarm.start_nodes(str(tiny_model), ["0:3", "3:6"], "--throughput", "1000")
        swarm.start_nodes(str(tiny_model), ["0:6"], "--throughput", "1")  # a slow spare for both spans
        # one row per micro-batch: three chunks hit the dead node at once, ban it once and move on
        with make_client(tiny_model, swarm, "deep_ptune", max_chunk_rows=1) as model:
            input_ids = torch.randint(3, 256, (3, 7), generator=torch.Generator().manual_seed(4))
            # throughput-weighted routes: retry until the forward used both preferred nodes
            for _ in range(50):
                logits = model(input_ids).logits
                if [s.peer_id for s in model.last_route] == [p.peer_id for p in preferred]:
                    break
            assert [s.peer_id for s in model.last_route] == [p.peer_id for p in preferred]
            preferred[1].kill()
            logits.log_softmax(-1)[..., 5].mean().backward()
            assert model.bans.failures(preferred[1].peer_id) == 1

            prompts = model.prompt_embeddings.weight.detach().clone().requires_grad_(True)
            deep = deep_prompts_of(model).detach().clone().requires_grad_(True)
            local_logits(local_model, input_ids, prompts, deep).log_softmax(-1)[..., 5].mean().backward()
            torch.testing.assert_close(model.prompt_embeddings.weight.grad, prompts.grad, rtol=0, atol=1e-5)
