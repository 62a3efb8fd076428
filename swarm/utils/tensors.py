"""Tensor (de)serialization for the wire, with checks that run before any large allocation."""

from __future__ import annotations

import math

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INDEX_DTYPES = {"int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
_ITEM_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1}


class BadTensorError(ValueError):
    """A tensor from the wire that is malformed."""


class TensorTooLargeError(BadTensorError):
    """A tensor from the wire that is over a size limit."""


def serialize(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    """Serialize without compression (exactness matters more than bytes on the hidden-state path)."""
    return serialize_torch_tensor(tensor.detach().contiguous().cpu())


def tensor_nbytes(proto: runtime_pb2.Tensor) -> int:
    return len(proto.buffer)


def deserialize_checked(
    proto: runtime_pb2.Tensor,
    *,
    name: str,
    allowed_dtypes: dict[str, torch.dtype],
    ndim: int | None,
    max_bytes: int,
) -> torch.Tensor:
    """Decode a tensor after checking dtype, rank, byte limit and that the buffer matches the shape."""
    if proto.dtype not in allowed_dtypes:
        raise BadTensorError(
            f"{name}: dtype {proto.dtype!r} not allowed (expected one of {list(allowed_dtypes)})"
        )
    if proto.compression != runtime_pb2.CompressionType.NONE:
        raise BadTensorError(f"{name}: compression {proto.compression} is not accepted")
    shape = tuple(proto.size)
    if ndim is not None and len(shape) != ndim:
        raise BadTensorError(f"{name}: expected {ndim} dimensions, got shape {shape}")
    expected_bytes = math.prod(shape) * _ITEM_SIZE[proto.dtype]
    if expected_bytes > max_bytes:
        raise TensorTooLargeError(f"{name}: {expected_bytes} bytes exceeds the limit of {max_bytes}")
    if len(proto.buffer) != expected_bytes:
        raise BadTensorError(
            f"{name}: buffer has {len(proto.buffer)} bytes, shape {shape} needs {expected_bytes}"
        )
    try:
        return deserialize_torch_tensor(proto)
    except Exception as e:
        raise BadTensorError(f"{name}: cannot decode: {e}") from None


def check_finite(tensor: torch.Tensor, name: str) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise BadTensorError(f"{name} contains NaN or infinite values")
