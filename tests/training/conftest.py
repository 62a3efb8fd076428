"""Fixtures for training tests: a tiny trainable Llama with a byte-level tokenizer, a corpus, run files."""

from __future__ import annotations

from pathlib import Path

import pytest
from training_helpers import CORPUS

from swarm.models.tiny import write_tiny_llama, write_tiny_tokenizer


@pytest.fixture(scope="session")
def train_model(tmp_path_factory) -> Path:
    """A 4-block random Llama with a tokenizer, in its own folder."""
    path = write_tiny_llama(tmp_path_factory.mktemp("train") / "tiny-train", num_blocks=4, seed=1)
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def corpus_split(tmp_path_factory) -> tuple[Path, Path]:
    """The shipped corpus cut into a training file (first 90%) and a held-out file (the rest)."""
    text = CORPUS.read_text()
    cut = text.index("\n\n", int(len(text) * 0.9))
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "train.txt").write_text(text[:cut])
    (folder / "heldout.txt").write_text(text[cut:])
    return folder / "train.txt", folder / "heldout.txt"
