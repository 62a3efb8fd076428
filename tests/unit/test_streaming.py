"""Reassembling streamed tensors as their parts arrive, and batching parts into messages."""

import pytest
import torch

from swarm.utils.streaming import TensorAssembler, batch_parts, combine_parts, split_tensors
from swarm.utils.tensors import BadTensorError, TensorTooLargeError, serialize


def test_assembler_knows_when_a_reply_is_whole():
    """A reader stops once the tensors it expects are whole, and rejects a stream cut inside one."""
    parts = split_tensors([serialize(torch.randn(300_000)), serialize(torch.randn(3))], 256 * 1024)
    assembler = TensorAssembler(10**9)
    for part in parts[:-2]:
        assembler.add(part)
    assert not assembler.has(1)
    with pytest.raises(BadTensorError, match="parts of a tensor missing"):
        assembler.finish()
    assembler.add(parts[-2])
    assert assembler.has(1) and not assembler.has(2)
    assembler.add(parts[-1])
    assert assembler.has(2) and len(assembler.finish()) == 2
    batches = list(batch_parts(parts, 512 * 1024))
    # the big tensor's 5 parts (4 of 256 KiB, one of 148 kB) two to a message; the small one shares the last
    assert [len(b) for b in batches] == [2, 2, 2]
    assert sum(batches, []) == parts


def test_combine_parts_refuses_more_than_its_limit():
    parts = split_tensors([serialize(torch.randn(1000))], 1024)
    with pytest.raises(TensorTooLargeError):
        combine_parts(parts, 3999)
    assert len(combine_parts(parts, 4000)) == 1


def test_a_streamed_reply_is_refused_at_the_part_that_passes_the_cap():
    """A hostile node streaming an endless reply costs the client at most its cap, not the whole stream."""
    parts = split_tensors([serialize(torch.randn(10_000)) for _ in range(50)], 4096)  # ~2 MB in 4 kB parts
    cap = 100_000
    assembler = TensorAssembler(cap)
    received = 0
    with pytest.raises(TensorTooLargeError, match="exceed the limit"):
        for part in parts:
            received += len(part.buffer)
            assembler.add(part)
    assert cap < received <= cap + 4096  # it stopped at the first part past the cap
    # a tensor that declares more than the cap is refused at its first part
    huge = split_tensors([serialize(torch.randn(40_000))], 4096)
    with pytest.raises(TensorTooLargeError, match="streamed tensor of 160000 bytes"):
        TensorAssembler(cap).add(huge[0])
