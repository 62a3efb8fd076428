"""Digests of exact tensor bytes, a Merkle tree over them, and a span's commitment to its whole trace.

The tree follows RFC 9162 (Certificate Transparency v2): leaves are hashed as sha256(0x00 || leaf) and
inner nodes as sha256(0x01 || left || right), so a leaf can never pass for an inner node; a tree of n
leaves splits at the largest power of two below n, so any n works and a proof names n.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from swarm.models.span import LlamaSpan
from swarm.verification.trace import OPERATORS, SpanTrace

DIGEST_SIZE = 32
_LEAF, _INNER = b"\x00", b"\x01"


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """sha256 of a tensor's dtype, shape and exact bytes (so equal bytes of another shape or type differ)."""
    tensor = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    # raw bytes through a uint8 view: works for every dtype, bfloat16 included, without conversion
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy
    return digest.digest()


def _hash_leaf(leaf: bytes) -> bytes:
    return hashlib.sha256(_LEAF + leaf).digest()


def _hash_inner(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_INNER + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2): where RFC 9162 splits a tree of n leaves."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """A Merkle tree over leaf digests, with inclusion proofs."""

    def __init__(self, leaves: Sequence[bytes]):
        if not leaves:
            raise ValueError("a Merkle tree needs at least one leaf")
        self.leaves = tuple(leaves)
        self._nodes: dict[tuple[int, int], bytes] = {}  # (first, end) -> subtree hash, shared by proofs
        self.root = self._subtree(0, len(self.leaves))

    def _subtree(self, first: int, end: int) -> bytes:
        if (first, end) not in self._nodes:
            if end - first == 1:
                node = _hash_leaf(self.leaves[first])
            else:
                middle = first + _split(end - first)
                node = _hash_inner(self._subtree(first, middle), self._subtree(middle, end))
            self._nodes[(first, end)] = node
        return self._nodes[(first, end)]

    def proof(self, index: int) -> tuple[bytes, ...]:
        """The sibling hashes from leaf `index` up to the root (nearest first)."""
        if not 0 <= index < len(self.leaves):
            raise IndexError(f"leaf {index} is outside a tree of {len(self.leaves)} leaves")
        path: list[bytes] = []
        first, end = 0, len(self.leaves)
        while end - first > 1:
            middle = first + _split(end - first)
            if index < middle:
                path.append(self._subtree(middle, end))
                end = middle
            else:
                path.append(self._subtree(first, middle))
                first = middle
        return tuple(reversed(path))


def verify_proof(root: bytes, leaf: bytes, index: int, proof: Sequence[bytes], num_leaves: int) -> bool:
    """Whether `leaf` sits at `index` of the `num_leaves`-leaf tree with this root (RFC 9162, 2.1.3.2)."""
    # answers come from untrusted peers: anything but digests is a failed proof, not an exception
    if not isinstance(leaf, bytes) or not 0 <= index < num_leaves:
        return False
    if any(not isinstance(node, bytes) or len(node) != DIGEST_SIZE for node in proof):
        return False
    position, last, node = index, num_leaves - 1, _hash_leaf(leaf)
    for sibling in proof:
        if last == 0:
            return False  # longer than the tree is deep
        if position & 1 or position == last:
            node = _hash_inner(sibling, node)
            # a rightmost node without a sibling at this level moves up unchanged
            while not position & 1 and position != 0:
                position, last = position >> 1, last >> 1
        else:
            node = _hash_inner(node, sibling)
        position, last = position >> 1, last >> 1
    return last == 0 and node == root


def node_hashes(
    root: bytes, leaf: bytes, index: int, proof: Sequence[bytes], num_leaves: int
) -> dict[tuple[int, int], bytes] | None:
    """Every subtree hash a valid inclusion proof reveals, by (first leaf, end): the nodes on the leaf's path
    and their siblings; None when the proof does not lead to `root`."""
    if not isinstance(leaf, bytes) or not 0 <= index < num_leaves:
        return None
    if any(not isinstance(node, bytes) or len(node) != DIGEST_SIZE for node in proof):
        return None
    path, siblings = [(0, num_leaves)], []
    first, end = 0, num_leaves
    while end - first > 1:
        middle = first + _split(end - first)
        if index < middle:
            siblings.append((middle, end))
            end = middle
        else:
            siblings.append((first, middle))
            first = middle
        path.append((first, end))
    if len(proof) != len(siblings):
        return None
    node = _hash_leaf(leaf)
    nodes = {path[-1]: node}
    for level, sibling_hash in enumerate(proof):
        sibling, below = siblings[-1 - level], path[-1 - level]
        node = _hash_inner(node, sibling_hash) if sibling[0] == below[1] else _hash_inner(sibling_hash, node)
        nodes[sibling], nodes[path[-2 - level]] = sibling_hash, node
    return nodes if node == root else None


def operator_leaf(block: int, op: str) -> int:
    """The leaf index of block `block`'s (index within the span) output of `op`: block-major."""
    return block * len(OPERATORS) + OPERATORS.index(op)


def operator_digests(trace: SpanTrace) -> list[bytes]:
    """The digests of every operator output of a trace, in leaf order."""
    return [tensor_digest(tensor) for block in trace.blocks for _, tensor in block]


# id(tensor) -> (a weak reference to it, its storage address and version when hashed, the digest): weights are
# hashed at every commitment, and re-hashing a frozen span's weights cost more than tracing its forward
_WEIGHT_DIGESTS: dict[int, tuple[weakref.ref, int, int, bytes]] = {}


def weight_digest(tensor: torch.Tensor) -> bytes:
    """tensor_digest of a weight, remembered until the tensor changes (any in-place update bumps its
    version counter; a swapped `.data` moves its storage). Inference tensors (made under
    torch.inference_mode, e.g. a span loaded during generate()) have no version counter: never remembered."""
    if tensor.is_inference():
        return tensor_digest(tensor)
    key, address, version = id(tensor), tensor.data_ptr(), tensor._version
    cached = _WEIGHT_DIGESTS.get(key)
    if cached is not None and cached[0]() is tensor and cached[1:3] == (address, version):
        return cached[3]
    digest = tensor_digest(tensor)
    _WEIGHT_DIGESTS[key] = (
        weakref.ref(tensor, lambda _, key=key: _WEIGHT_DIGESTS.pop(key, None)),
        address,
        version,
        digest,
    )
    return digest


def block_weight_digest(layer: nn.Module) -> bytes:
    """One hash of a block's weights: each state_dict tensor's digest, with its name, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(layer.state_dict(keep_vars=True).items()):
        digest.update(name.encode() + b"\x00" + weight_digest(tensor))
    return digest.digest()


@dataclass(frozen=True)
class SpanCommitment:
    """What a party binds itself to for one forward of blocks [start, end): enough to referee a dispute."""

    start: int
    end: int
    input_digest: bytes
    block_output_digests: tuple[bytes, ...]
    operator_root: bytes  # over every operator output, block-major, OPERATORS order
    num_leaves: int
    block_weight_digests: tuple[bytes, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe form (digests as hex) to sign and send."""
        return {
            "start": self.start,
            "end": self.end,
            "input_digest": self.input_digest.hex(),
            "block_output_digests": [d.hex() for d in self.block_output_digests],
            "operator_root": self.operator_root.hex(),
            "num_leaves": self.num_leaves,
            "block_weight_digests": [d.hex() for d in self.block_weight_digests],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpanCommitment:
        """Parse to_dict's form, refusing anything malformed (it may come from an untrusted peer)."""
        commitment = cls(
            start=int(data["start"]),
            end=int(data["end"]),
            input_digest=_digest(data["input_digest"]),
            block_output_digests=tuple(_digest(d) for d in data["block_output_digests"]),
            operator_root=_digest(data["operator_root"]),
            num_leaves=int(data["num_leaves"]),
            block_weight_digests=tuple(_digest(d) for d in data["block_weight_digests"]),
        )
        blocks = commitment.end - commitment.start
        if not 0 <= commitment.start < commitment.end:
            raise ValueError(f"bad span [{commitment.start}, {commitment.end})")
        if len(commitment.block_output_digests) != blocks or len(commitment.block_weight_digests) != blocks:
            raise ValueError(f"a commitment to {blocks} blocks needs {blocks} output and weight digests")
        if commitment.num_leaves != blocks * len(OPERATORS):
            raise ValueError(f"{blocks} blocks have {blocks * len(OPERATORS)} operator outputs")
        return commitment


def _digest(text: str) -> bytes:
    digest = bytes.fromhex(text)
    if len(digest) != DIGEST_SIZE:
        raise ValueError(f"a digest has {DIGEST_SIZE} bytes, got {len(digest)}")
    return digest


def commit_trace(trace: SpanTrace, span: LlamaSpan, leaves: Sequence[bytes] | None = None) -> SpanCommitment:
    """The commitment to a trace of `span`'s forward; `leaves`: its operator_digests, if already known."""
    if len(trace.blocks) != len(span.layers):
        raise ValueError(f"the trace has {len(trace.blocks)} blocks, the span {len(span.layers)}")
    leaves = operator_digests(trace) if leaves is None else list(leaves)
    return SpanCommitment(
        start=span.start,
        end=span.end,
        input_digest=tensor_digest(trace.input),
        block_output_digests=tuple(leaves[operator_leaf(b, OPERATORS[-1])] for b in range(len(trace.blocks))),
        operator_root=MerkleTree(leaves).root,
        num_leaves=len(leaves),
        block_weight_digests=tuple(block_weight_digest(layer) for layer in span.layers),
    )
