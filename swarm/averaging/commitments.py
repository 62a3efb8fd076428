"""What the peers of a robust averaging round sign, and the chunks their hashes cover.

The flattened tensors of a round are cut into chunks exactly as hivemind's all-reduce cuts them (each
tensor on its own, `part_size_bytes` at a time), numbered across all tensors: chunk `g`. The layout does
not depend on the group, so a peer can commit to its chunks before it knows who it will meet; the group
then only decides which peer reduces which chunk (a contiguous range of chunks per reducer).

Statements of one round (all signed, see `swarm.averaging.statements`; `prefix` is the averaging group's
name, `step` the round key the members agreed on, `group` hivemind's group id):
- commit   {prefix, step, chunks: [sha256 of chunk g], seed_commit: sha256(secret)}  before the round,
           carried in hivemind's gathered data
- parts    {prefix, step, first, hashes: [sha256 of chunk first + i], commit: sha256 of the sender's commit}
           once per reducer, with the first part a sender sends it: the hashes of the chunks that reducer
           reduces (a contiguous range), one signature per reducer instead of one per part
- result   {prefix, step, group, chunk, hash, senders: [peer ids whose parts were reduced]}  with every
           reduced part a reducer sends back
- after    {prefix, step, group, seed: secret, results: {chunk: hash}}  published by every sender after
           the all-reduce: its share of the random seed and the results of the chunks it reduced
- projections {prefix, step, group, values: {chunk: [<z, x_i - v>, ||x_i - v||, ||v||]}}  published once the
           seed is known (see `swarm.averaging.projection`)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import runtime_pb2

from swarm.averaging.statements import digest

DEFAULT_PART_SIZE_BYTES = 2**19  # hivemind's all-reduce default


def chunk_values(element_size: int, part_size_bytes: int = DEFAULT_PART_SIZE_BYTES) -> int:
    """How many values of `element_size` bytes one chunk holds (hivemind's rule, uncompressed)."""
    return int(part_size_bytes / element_size)


def split_chunks(
    tensors: Sequence[torch.Tensor], part_size_bytes: int = DEFAULT_PART_SIZE_BYTES
) -> list[torch.Tensor]:
    """The round's chunks, in order: each tensor flattened and cut into pieces of `chunk_values`."""
    chunks: list[torch.Tensor] = []
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        chunks.extend(flat.split(chunk_values(tensor.element_size(), part_size_bytes)))
    return chunks


def part_bytes(part: torch.Tensor) -> bytes:
    """The bytes a part travels as (uncompressed hivemind serialization): what its hash covers."""
    return serialize_torch_tensor(part.detach().contiguous(), runtime_pb2.CompressionType.NONE).buffer


def part_digest(part: torch.Tensor) -> bytes:
    """sha256 of `part_bytes(part)`, the hash a commitment holds for a chunk.

    hivemind's uncompressed serialization is the tensor's memory as it is (`numpy().tobytes()`), except for
    bfloat16 (which it may convert): so the memory is hashed in place, without copying it into bytes first.
    """
    part = part.detach()
    if part.device.type == "cpu" and part.dtype != torch.bfloat16:
        try:
            return hashlib.sha256(part.contiguous().numpy()).digest()
        except (TypeError, RuntimeError, BufferError, ValueError):
            pass  # a tensor numpy can't view (e.g. a lazy negation): serialize it
    return digest(part_bytes(part))


def chunk_digests(
    tensors: Sequence[torch.Tensor], part_size_bytes: int = DEFAULT_PART_SIZE_BYTES
) -> list[bytes]:
    """sha256 of every chunk's bytes, in chunk order."""
    return [part_digest(chunk) for chunk in split_chunks(tensors, part_size_bytes)]


def commit_payload(prefix: str, step: int, chunks: list[bytes], seed_commit: bytes) -> dict:
    return {"kind": "commit", "prefix": prefix, "step": step, "chunks": chunks, "seed_commit": seed_commit}


def parts_payload(prefix: str, step: int, first: int, hashes: Sequence[bytes], commit: bytes) -> dict:
    """What a sender sends one reducer: chunks `first`, `first + 1`, ... with these hashes. `commit` is the
    sha256 of the sender's commit statement: parts of one round can't be paired with the commitment of
    another round of the same step as false proof of equivocation."""
    return {
        "kind": "parts",
        "prefix": prefix,
        "step": step,
        "first": first,
        "hashes": list(hashes),
        "commit": commit,
    }


def part_hash(parts: dict, chunk: int) -> bytes | None:
    """The hash a parts statement's payload signs for `chunk`; None when it covers no such chunk."""
    first, hashes = parts.get("first"), parts.get("hashes")
    if not isinstance(first, int) or not isinstance(hashes, list) or not 0 <= chunk - first < len(hashes):
        return None
    hash_ = hashes[chunk - first]
    return hash_ if isinstance(hash_, bytes) else None


def result_payload(
    prefix: str, step: int, group: bytes, chunk: int, hash_: bytes, senders: list[str]
) -> dict:
    return {
        "kind": "result",
        "prefix": prefix,
        "step": step,
        "group": group,
        "chunk": chunk,
        "hash": hash_,
        "senders": senders,
    }


def after_payload(prefix: str, step: int, group: bytes, seed: bytes, results: dict[int, bytes]) -> dict:
    return {"kind": "after", "prefix": prefix, "step": step, "group": group, "seed": seed, "results": results}


def projections_payload(prefix: str, step: int, group: bytes, values: dict[int, tuple[float, ...]]) -> dict:
    """`values`: chunk -> (<z, x_i - v>, ||x_i - v||, ||v||); ||v|| lets checkers allow for its rounding."""
    return {
        "kind": "projections",
        "prefix": prefix,
        "step": step,
        "group": group,
        "values": {chunk: [float(x) for x in value] for chunk, value in values.items()},
    }


def round_key(prefix: str, step: int, group: bytes) -> str:
    """The DHT key under which the members of one round publish their `after` and `projections`."""
    return f"{prefix}_btard_{step}_{group.hex()[:32]}"
