"""A stage whose every peer is gone: rebuild its weights from its neighbours (CheckFree) or a checkpoint.

CheckFree ("All is Not Lost: LLM Recovery without Checkpoints"): a lost middle stage i gets, block by block,
(a * W[i+1] + b * W[i-1]) / (a + b), where a and b are the neighbouring stages' recent gradient norms; the
first and last stages copy their one neighbour. The rebuilt stage starts with a fresh optimizer and trains
at CHECKFREE_LR_FACTOR x the learning rate for CHECKFREE_BOOST_STEPS steps.

Blocks are matched by their position within the stage: block j of the lost stage takes block j of each
neighbour. Stages may differ in length (`split_stages` gives the first ones one block more): position j of a
shorter neighbour is clamped to its last block.

Checkpoints: a node with a checkpoint folder saves its stage's state (parameters, AdamW moments, step) every
N steps, atomically, one file per run file and stage. A peer that finds its stage empty takes that file when
it holds trained weights (step > 0) instead of CheckFree's estimate: the stage's own weights, a few steps old,
are closer to what was lost than an average of other stages' blocks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from swarm.training.state import TrainState

CHECKFREE_LR_FACTOR = 1.2
CHECKFREE_BOOST_STEPS = 20
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


@dataclass
class Neighbour:
    """A neighbouring stage's parameters (names as `model.layers.{block}.*`), its blocks and its weight."""

    state: TrainState
    blocks: tuple[int, int]
    grad_norm: float


def checkfree_weights(names: Sequence[str], blocks: tuple[int, int], neighbours: Sequence[Neighbour]):
    """The lost stage's parameters (`names`, blocks [start, end)) rebuilt from one or two neighbours: each
    neighbour's block at the same position, averaged with weights proportional to the *other* neighbour's
    gradient norm as CheckFree writes it (equal weights when the norms are unknown)."""
    if not neighbours or len(neighbours) > 2:
        raise ValueError(f"CheckFree rebuilds a stage from one or two neighbours, got {len(neighbours)}")
    if len(neighbours) == 1:
        weights = [1.0]
    else:
        # (a * W[i+1] + b * W[i-1]) / (a + b), a and b the gradient norms of stages i+1 and i-1
        norms = [max(n.grad_norm, 0.0) for n in neighbours]
        total = sum(norms)
        weights = [norm / total for norm in norms] if total > 0 else [0.5, 0.5]
    start, _ = blocks
    rebuilt = {}
    for name in names:
        match = _LAYER_NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"{name} is not a block's parameter")
        position, rest = int(match.group(1)) - start, match.group(2)
        tensor = None
        for neighbour, weight in zip(neighbours, weights, strict=True):
            first, last = neighbour.blocks[0], neighbour.blocks[1] - 1
            source = f"model.layers.{min(first + position, last)}.{rest}"
            if source not in neighbour.state.tensors:
                raise ValueError(f"the neighbour's state lacks {source}")
            part = neighbour.state.tensors[source].detach().to(torch.float32) * weight
            tensor = part if tensor is None else tensor + part
        rebuilt[name] = tensor
    return rebuilt


# ---- checkpoints ----------------------------------------------------------------------------------------


def checkpoint_path(folder: str | os.PathLike, run_id: str, run_hash: str, stage: int) -> Path:
    return Path(folder) / f"{run_id}-{run_hash[:16]}-stage{stage}.pt"


def save_checkpoint(path: Path, run_hash: str, stage: int, state: TrainState) -> None:
    """Write the stage's state to `path` atomically: a reader sees the previous file or this one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"run_hash": run_hash, "stage": stage, "step": state.step, "tensors": state.tensors}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, run_hash: str, stage: int) -> TrainState | None:
    """The state saved at `path` if it is this run file's and stage's (None if there is no such file)."""
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("run_hash") != run_hash or saved.get("stage") != stage:
        raise ValueError(f"{path} holds stage {saved.get('stage')} of another run file or stage")
    return TrainState(int(saved["step"]), dict(saved["tensors"]))
