"""Helpers shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import torch

from swarm.training.run import load_run, make_run, write_run

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "data" / "corpus.txt"


def write_test_run(path: Path, model: Path, run_id: str, stages: int = 2, **settings):
    """A run file with test-sized settings (short averaging rounds); returns the loaded run."""
    defaults = dict(
        target_batch_size=16, microbatch_size=4, seq_len=32, matchmaking_time=2.0, averaging_timeout=8.0
    )
    write_run(make_run(run_id, str(model), stages, **{**defaults, **settings}), path)
    return load_run(path)


def assemble_model(model_path: Path, tensors: dict[str, torch.Tensor]):
    """A plain transformers model holding the given (trained) tensors."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    state = model.state_dict()
    assert set(tensors) <= set(state), set(tensors) - set(state)
    model.load_state_dict({**state, **tensors})
    return model


def heldout_loss(model, sequences: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=sequences, labels=sequences).loss.item()
