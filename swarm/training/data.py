"""Training data for a trainer: a UTF-8 text file cut into sequences of the run's length."""

from __future__ import annotations

import hashlib
import os
import random

import torch


class TextSequences:
    """The file's tokens cut into `seq_len`-token sequences (the tail that does not fill one is dropped)."""

    def __init__(self, path: str | os.PathLike, tokenizer, seq_len: int):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        count = len(ids) // seq_len
        if count < 1:
            raise ValueError(f"{path} has {len(ids)} tokens: fewer than one sequence of {seq_len}")
        self.sequences = torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)

    def __len__(self) -> int:
        return self.sequences.shape[0]


class MicrobatchSampler:
    """Microbatch i of a run: in file order (wrapping around), or shuffled with a per-trainer seed.

    `sequential`: microbatch i is sequences [i*m, (i+1)*m) modulo the file, so a run can be reproduced
    exactly. `shuffle`: epochs of a permutation drawn from the run's seed and the trainer's peer id.
    """

    def __init__(self, data: TextSequences, microbatch_size: int, order: str, seed: int, peer_id: str):
        if order not in ("sequential", "shuffle"):
            raise ValueError(f"unknown data order {order!r}")
        self.data, self.size, self.order = data, microbatch_size, order
        digest = hashlib.sha256(f"{seed}:{peer_id}".encode()).digest()
        self._rng = random.Random(int.from_bytes(digest[:8], "big"))
        self._permutation: list[int] = []
        self._next = 0

    def _indices(self, index: int) -> list[int]:
        n = len(self.data)
        if self.order == "sequential":
            return [(index * self.size + k) % n for k in range(self.size)]
        out = []
        while len(out) < self.size:
            if not self._permutation:
                self._permutation = list(range(n))
                self._rng.shuffle(self._permutation)
            out.append(self._permutation.pop())
        return out

    def take(self) -> torch.Tensor:
        """The next microbatch: (microbatch_size, seq_len) token ids."""
        index, self._next = self._next, self._next + 1
        return self.data.sequences[self._indices(index)]
