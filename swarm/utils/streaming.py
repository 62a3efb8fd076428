"""Split tensors into parts that fit in stream messages, and put them back together under a byte limit."""

from __future__ import annotations

import math
from collections.abc import Iterable

from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from swarm.utils.tensors import _ITEM_SIZE, BadTensorError, TensorTooLargeError


def split_tensors(tensors: Iterable[runtime_pb2.Tensor], chunk_bytes: int) -> list[runtime_pb2.Tensor]:
    """Flat list of parts; each tensor's first part carries its metadata and part count."""
    parts: list[runtime_pb2.Tensor] = []
    for tensor in tensors:
        parts.extend(split_for_streaming(tensor, chunk_bytes))
    return parts


def combine_parts(parts: Iterable[runtime_pb2.Tensor], max_total_bytes: int) -> list[runtime_pb2.Tensor]:
    """Rebuild tensors from streamed parts, refusing to buffer past `max_total_bytes`."""
    tensors: list[runtime_pb2.Tensor] = []
    current: runtime_pb2.Tensor | None = None
    buffers: list[bytes] = []
    remaining = 0
    total = 0
    for part in parts:
        total += len(part.buffer)
        if total > max_total_bytes:
            raise TensorTooLargeError(f"streamed tensors exceed the limit of {max_total_bytes} bytes")
        if remaining == 0:
            if part.dtype not in _ITEM_SIZE or part.chunks < 1:
                raise BadTensorError("stream part does not start a tensor (missing dtype or chunk count)")
            declared = math.prod(part.size) * _ITEM_SIZE[part.dtype]
            if declared > max_total_bytes:
                raise TensorTooLargeError(
                    f"streamed tensor of {declared} bytes exceeds the limit of {max_total_bytes}"
                )
            current, buffers, remaining = part, [], part.chunks
        buffers.append(part.buffer)
        remaining -= 1
        if remaining == 0:
            tensor = runtime_pb2.Tensor()
            tensor.CopyFrom(current)
            tensor.buffer = b"".join(buffers)
            tensor.chunks = 0
            tensors.append(tensor)
    if remaining:
        raise BadTensorError(f"stream ended with {remaining} parts of a tensor missing")
    return tensors
