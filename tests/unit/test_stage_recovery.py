"""Rebuilding a lost stage: CheckFree's weighted average of its neighbours, checkpoints, the lr boost."""

from __future__ import annotations

import pytest
import torch

from swarm.training.recovery import (
    Neighbour,
    checkfree_weights,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from swarm.training.state import TrainState
from swarm.training.trainable import TrainableParameters


def stage_state(blocks: range, value: float) -> TrainState:
    return TrainState(5, {f"model.layers.{b}.mlp.weight": torch.full((2, 2), value + b) for b in blocks})


def test_a_middle_stage_averages_its_neighbours_by_their_gradient_norms():
    names = ["model.layers.2.mlp.weight", "model.layers.3.mlp.weight"]
    before = Neighbour(stage_state(range(0, 2), 0.0), (0, 2), grad_norm=1.0)  # blocks 0, 1 hold 0, 1
    after = Neighbour(stage_state(range(4, 6), 10.0), (4, 6), grad_norm=3.0)  # blocks 4, 5 hold 14, 15
    rebuilt = checkfree_weights(names, (2, 4), [before, after])
    # block j of the stage takes block j of each neighbour: (3 * W[i+1] + 1 * W[i-1]) / 4
    assert torch.equal(rebuilt[names[0]], torch.full((2, 2), (3 * 14 + 1 * 0) / 4))
    assert torch.equal(rebuilt[names[1]], torch.full((2, 2), (3 * 15 + 1 * 1) / 4))
    # unknown norms: equal weights
    unknown = [Neighbour(n.state, n.blocks, 0.0) for n in (before, after)]
    assert torch.equal(checkfree_weights(names, (2, 4), unknown)[names[0]], torch.full((2, 2), 7.0))


def test_the_first_stage_copies_its_one_neighbour_and_shorter_neighbours_clamp():
    names = ["model.layers.0.mlp.weight", "model.layers.1.mlp.weight", "model.layers.2.mlp.weight"]
    after = Neighbour(stage_state(range(3, 5), 0.0), (3, 5), grad_norm=2.0)  # 2 blocks for a 3-block stage
    rebuilt = checkfree_weights(names, (0, 3), [after])
    assert [float(rebuilt[n][0, 0]) for n in names] == [3.0, 4.0, 4.0]
    with pytest.raises(ValueError):
        checkfree_weights(["lm_head.weight"], (0, 3), [after])
    with pytest.raises(ValueError):
        checkfree_weights(names, (0, 3), [])


def test_checkpoints_are_per_run_and_stage(tmp_path):
    path = checkpoint_path(tmp_path / "ckpt", "run", "ab" * 32, 1)
    assert load_checkpoint(path, "ab" * 32, 1) is None
    state = stage_state(range(2, 4), 1.0)
    save_checkpoint(path, "ab" * 32, 1, state)
    loaded = load_checkpoint(path, "ab" * 32, 1)
    assert loaded.hash() == state.hash()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    with pytest.raises(ValueError):
        load_checkpoint(path, "cd" * 32, 1)  # another run file's
    with pytest.raises(ValueError):
        load_checkpoint(path, "ab" * 32, 2)


def test_the_learning_rate_boost_ends_after_its_steps():
    param = torch.nn.Parameter(torch.ones(3))
    trainable = TrainableParameters([("w", param)], 0.1, (0.9, 0.999), 1e-8, 0.0, 0.0)
    trainable.boost_lr(1.2, 2)
    lrs = []
    for _ in range(3):
        lrs.append(trainable.optimizer.param_groups[0]["lr"])
        trainable.apply([torch.full((3,), 2.0)])
    assert lrs == pytest.approx([0.12, 0.12, 0.1])
    # without clipping the gradient norm is still measured, for CheckFree's weights
    assert trainable.last_grad_norm == pytest.approx(2.0 * 3**0.5)
    assert trainable.recent_grad_norm == pytest.approx(2.0 * 3**0.5)
