"""Verdicts as signed DHT records that anyone can re-check at the cost of one operator.

A client that referees a dispute (swarm.verification.dispute) and convicts a node publishes a
`VerdictRecord` under `{model}.verdicts`, in its own owner subkey. Nobody has to trust the referee: the
record carries everything needed to redo the one decisive step of the game, and anyone holding the
disputed block's weights re-checks it (`check_verdict_record`). A verdict that does not check out proves
its author lied, and the author is banned instead of the accused.

Framing is impossible because every root in the evidence is tied to a party by that party's own signature:
`rpc_commit` replies carry the node's signed statement (swarm.averaging.statements, signed with the RSA key
its DHT records and libp2p identity use) naming

    kind "commit", the model, the span [start, end), num_leaves, the operator_root, the span's input
    digest, the final block output digest, sha256 of the commitment's canonical JSON, and digests of the
    attention mask and position ids the node was sent (b"" for none)

so a verdict can only convict a peer with a commitment that peer signed, on the forward it was really sent
(the mask and positions change what attention computes, so they are bound too), and the recomputation must
disagree with what that peer committed to.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgpack
import torch
from hivemind.dht import DHT
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from swarm.averaging.statements import InvalidStatement, open_statement, sign_statement
from swarm.dht.announcer import store_records
from swarm.dht.keys import split_owner_subkey, verdicts_key
from swarm.dht.records import MAX_VERDICT_RECORD_BYTES, RecordError, check_message, decode_record
from swarm.models.span import LlamaSpan
from swarm.proto import swarm_pb2
from swarm.utils.tensors import FLOAT_DTYPES, INDEX_DTYPES, deserialize_checked, serialize
from swarm.verification.determinism import deterministic_profile
from swarm.verification.dispute import PARTIES, Evidence, Verdict, recheck_verdict
from swarm.verification.merkle import DIGEST_SIZE, SpanCommitment, tensor_digest
from swarm.verification.operators import OPERATORS
from swarm.verification.trace import OPERATOR_INPUTS

logger = logging.getLogger(__name__)

COMMIT_KIND = "commit"
MAX_VERDICT_BYTES = MAX_VERDICT_RECORD_BYTES  # a record's serialized size (1 MiB)
MAX_PROOF_NODES = 64  # deeper than any tree of a span's operator outputs
MAX_LEAVES = 1 << 20  # far beyond any span's operator outputs: bounds what a hostile record may claim
NO_TENSOR = b""  # the digest a commit statement gives an absent mask or positions
REASONS = ("wrong_output",)  # the only losses a record can prove (silence, bad proofs rest on the referee)


class FalseVerdict(ValueError):
    """A verdict record that does not check out: its author is the one to ban."""

    def __init__(self, author: str, reason: str):
        super().__init__(f"the verdict by {author} does not check out ({reason}): ban its author")
        self.author, self.reason = author, reason


class VerdictTooLarge(ValueError):
    """A verdict record above MAX_VERDICT_BYTES: no reader would accept it."""


# ---- signed commitments ---------------------------------------------------------------------------------


def commitment_digest(commitment: SpanCommitment) -> bytes:
    """sha256 of the commitment's canonical JSON (sorted keys, no spaces): what a node signs it by."""
    canonical = json.dumps(commitment.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).digest()


def index_digest(tensor: torch.Tensor | None) -> bytes:
    """The digest of a mask or positions tensor as a node uses it (int64), or NO_TENSOR for none."""
    return NO_TENSOR if tensor is None else tensor_digest(tensor.to(torch.int64))


def commit_payload(
    model: str,
    commitment: SpanCommitment,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> dict[str, Any]:
    """What a node signs about one commitment (see the module's docstring)."""
    return {
        "kind": COMMIT_KIND,
        "model": model,
        "start": commitment.start,
        "end": commitment.end,
        "num_leaves": commitment.num_leaves,
        "operator_root": commitment.operator_root,
        "input_digest": commitment.input_digest,
        "output_digest": commitment.block_output_digests[-1],
        "commitment": commitment_digest(commitment),
        "attention_mask": index_digest(attention_mask),
        "position_ids": index_digest(position_ids),
    }


def sign_commitment(
    key: RSAPrivateKey,
    model: str,
    commitment: SpanCommitment,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> bytes:
    """A node's signed statement that it committed to `commitment` on a forward with this mask and
    positions (see the module's docstring)."""
    return sign_statement(key, commit_payload(model, commitment, attention_mask, position_ids))


@dataclass(frozen=True)
class CommitClaim:
    """What an opened commit statement says, with its signer's peer id (the fields a verdict relies on)."""

    signer: str
    model: str
    start: int
    end: int
    num_leaves: int
    operator_root: bytes
    input_digest: bytes
    output_digest: bytes
    commitment: bytes
    attention_mask: bytes
    position_ids: bytes


def open_commit(blob: bytes) -> CommitClaim:
    """Verify a commit statement and read its fields; raises InvalidStatement."""
    signer, payload = open_statement(blob)
    if payload.get("kind") != COMMIT_KIND:
        raise InvalidStatement(f"a {payload.get('kind')!r} statement, not a commit")
    fields: dict[str, Any] = {"signer": signer}
    for name in ("model",):
        fields[name] = _typed(payload, name, str)
    for name in ("start", "end", "num_leaves"):
        fields[name] = _typed(payload, name, int)
    for name in ("operator_root", "input_digest", "output_digest", "commitment"):
        fields[name] = _typed(payload, name, bytes, DIGEST_SIZE)
    for name in ("attention_mask", "position_ids"):
        value = _typed(payload, name, bytes)
        if len(value) not in (0, DIGEST_SIZE):
            raise InvalidStatement(f"{name} must be a digest or empty")
        fields[name] = value
    return CommitClaim(**fields)


def _typed(payload: Mapping[str, Any], name: str, kind: type, size: int | None = None) -> Any:
    value = payload.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) or (size is not None and len(value) != size):
        raise InvalidStatement(f"the commit statement's {name} is malformed")
    return value


def check_commit_signature(blob: bytes, commitment: SpanCommitment, model: str | None = None) -> str:
    """The peer id of the node that signed `blob` over exactly `commitment` (and `model`, if given).

    :raises InvalidStatement: if it does not open, or is about another commitment or model
    """
    claim = open_commit(blob)
    expected = {
        "start": commitment.start,
        "end": commitment.end,
        "num_leaves": commitment.num_leaves,
        "operator_root": commitment.operator_root,
        "input_digest": commitment.input_digest,
        "output_digest": commitment.block_output_digests[-1],
        "commitment": commitment_digest(commitment),
    }
    if model is not None:
        expected["model"] = model
    if wrong := [name for name, value in expected.items() if getattr(claim, name) != value]:
        raise InvalidStatement(f"the commit statement is about another commitment ({', '.join(wrong)})")
    return claim.signer


# ---- evidence codec --------------------------------------------------------------------------------------


def evidence_to_bytes(evidence: Evidence) -> bytes:
    """msgpack of an Evidence (proofs as lists)."""
    return msgpack.packb(
        {
            "num_leaves": evidence.num_leaves,
            "roots": dict(evidence.roots),
            "span_input_digest": evidence.span_input_digest,
            "input_refs": dict(evidence.input_refs),
            "input_digests": dict(evidence.input_digests),
            "input_proofs": {
                party: {name: list(proof) for name, proof in proofs.items()}
                for party, proofs in evidence.input_proofs.items()
            },
            "output_ref": evidence.output_ref,
            "claimed_outputs": dict(evidence.claimed_outputs),
            "output_proofs": {party: list(proof) for party, proof in evidence.output_proofs.items()},
            "recomputed_output": evidence.recomputed_output,
            "weight_digest": evidence.weight_digest,
        },
        use_bin_type=True,
    )


def evidence_from_bytes(data: bytes) -> Evidence:
    """Parse evidence_to_bytes' form, refusing anything malformed (ValueError): it comes from anyone."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:
        raise ValueError(f"the evidence is not msgpack: {e!r}") from None
    if not isinstance(raw, dict):
        raise ValueError("the evidence must be a map")
    names = _map(raw, "input_refs", lambda value, what: _int(value, what, -1), max_entries=8)
    if not names or not all(isinstance(name, str) for name in names):
        raise ValueError("the evidence must name the operator's inputs")
    input_proofs = _by_party(
        raw, "input_proofs", lambda value, what: _map_of(value, what, _proof, allowed=set(names))
    )
    return Evidence(
        num_leaves=_int(raw.get("num_leaves"), "num_leaves", 1, MAX_LEAVES),
        roots=_by_party(raw, "roots", _digest),
        span_input_digest=_digest(raw.get("span_input_digest"), "span_input_digest"),
        input_refs=names,
        input_digests=_map(raw, "input_digests", _digest, allowed=set(names)),
        input_proofs=input_proofs,
        output_ref=_int(raw.get("output_ref"), "output_ref", 0, MAX_LEAVES),
        claimed_outputs=_by_party(raw, "claimed_outputs", _digest),
        output_proofs=_by_party(raw, "output_proofs", _proof),
        recomputed_output=_digest(raw.get("recomputed_output"), "recomputed_output"),
        weight_digest=_digest(raw.get("weight_digest"), "weight_digest"),
    )


def _int(value: Any, what: str, low: int, high: int = MAX_LEAVES) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"evidence {what}: expected an integer in [{low}, {high}]")
    return value


def _digest(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != DIGEST_SIZE:
        raise ValueError(f"evidence {what}: expected a {DIGEST_SIZE}-byte digest")
    return value


def _proof(value: Any, what: str) -> tuple[bytes, ...]:
    if not isinstance(value, list) or len(value) > MAX_PROOF_NODES:
        raise ValueError(f"evidence {what}: expected a list of at most {MAX_PROOF_NODES} digests")
    return tuple(_digest(node, what) for node in value)


def _map_of(value: Any, what: str, convert, allowed: set[str] | None = None, max_entries: int = 8) -> dict:
    if not isinstance(value, dict) or len(value) > max_entries:
        raise ValueError(f"evidence {what}: expected a map of at most {max_entries} entries")
    if allowed is not None and not set(value) <= allowed:
        raise ValueError(f"evidence {what}: unexpected keys {sorted(map(str, set(value) - allowed))}")
    return {key: convert(item, f"{what}[{key}]") for key, item in value.items()}


def _map(raw: Mapping[str, Any], name: str, convert, allowed: set[str] | None = None, max_entries=8) -> dict:
    return _map_of(raw.get(name), name, convert, allowed, max_entries)


def _by_party(raw: Mapping[str, Any], name: str, convert) -> dict:
    value = _map(raw, name, convert, allowed=set(PARTIES))
    if set(value) != set(PARTIES):
        raise ValueError(f"evidence {name}: expected one entry per party {PARTIES}")
    return value


# ---- records ---------------------------------------------------------------------------------------------


def make_verdict_record(
    model: str,
    verdict: Verdict,
    parties: Mapping[str, str],
    signed_commits: Mapping[str, bytes],
    input_tensors: Mapping[str, torch.Tensor],
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    author: str = "",
    timestamp: float | None = None,
    profile: Mapping[str, str] | None = None,
) -> swarm_pb2.VerdictRecord:
    """The record of a verdict settled by recomputation: parties map "a"/"b" to peer ids, signed_commits
    to each one's statement from rpc_commit; the tensors are the disputed operator's inputs and forward's
    mask and positions, as the parties were sent them. `author` may be left for publish_verdict to fill;
    `profile` is the determinism profile the referee recomputed with (only a peer with the same one can
    re-check the verdict).

    :raises ValueError: the verdict can't be proven (no evidence, statements that are not the parties'
        own over the evidence's roots, missing inputs); VerdictTooLarge above MAX_VERDICT_BYTES
    """
    if verdict.evidence is None or verdict.block is None or verdict.op is None:
        raise ValueError("only a verdict settled by recomputing an operator can be published")
    if set(parties) != set(PARTIES) or set(signed_commits) != set(PARTIES):
        raise ValueError(f"parties and signed_commits need exactly the parties {PARTIES}")
    if set(input_tensors) != set(OPERATOR_INPUTS[verdict.op]):
        raise ValueError(f"{verdict.op} reads {OPERATOR_INPUTS[verdict.op]}, got {sorted(input_tensors)}")
    record = swarm_pb2.VerdictRecord(
        model=model,
        author=author,
        parties=[parties[name] for name in PARTIES],
        signed_commits=[signed_commits[name] for name in PARTIES],
        losers=[parties[name] for name in verdict.losers],
        reasons={parties[name]: reason for name, reason in verdict.reasons.items()},
        first_block=verdict.first_block,
        block=verdict.block,
        op=verdict.op,
        rounds=verdict.rounds,
        bytes_moved=verdict.bytes_moved,
        evidence=evidence_to_bytes(verdict.evidence),
        inputs={name: serialize(tensor) for name, tensor in input_tensors.items()},
        timestamp=get_dht_time() if timestamp is None else timestamp,
        profile=dict(profile or {}),
    )
    if attention_mask is not None:
        record.attention_mask.CopyFrom(serialize(attention_mask))
    if position_ids is not None:
        record.position_ids.CopyFrom(serialize(position_ids))
    check_record_size(record)
    # a referee must not publish what would get it banned: the signatures must hold now
    _check_parties(record, verdict.evidence, attention_mask, position_ids)
    return record


def check_record_size(record: swarm_pb2.VerdictRecord) -> int:
    """The record's serialized size; raises VerdictTooLarge above MAX_VERDICT_BYTES."""
    size = record.ByteSize()
    if size > MAX_VERDICT_BYTES:
        raise VerdictTooLarge(
            f"the verdict record takes {size} bytes, over the limit of {MAX_VERDICT_BYTES}: the disputed "
            "operator's inputs are too large to publish (dispute a shorter forward)"
        )
    return size


def record_digest(record: swarm_pb2.VerdictRecord) -> bytes:
    """sha256 of the record's deterministic serialization: what a VerdictBook remembers it by."""
    return hashlib.sha256(record.SerializeToString(deterministic=True)).digest()


def decode_verdict(author: str, data: bytes) -> swarm_pb2.VerdictRecord:
    """A VerdictRecord from its serialized bytes, published by `author` (the subkey's owner).

    :raises FalseVerdict: bytes that do not parse or break the schema: whoever published them is to blame
    """
    if not isinstance(data, bytes) or len(data) > MAX_VERDICT_BYTES:
        raise FalseVerdict(author, f"a verdict record must be at most {MAX_VERDICT_BYTES} bytes")
    record = swarm_pb2.VerdictRecord()
    try:
        record.ParseFromString(data)
        check_message(record)
    except Exception as e:
        raise FalseVerdict(author, f"the record does not parse: {e}") from None
    if record.author != author:
        raise FalseVerdict(author, f"the record names {record.author!r} as its author")
    return record


# ---- re-checking -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerdictClaim:
    """A record decoded into what recheck_verdict takes."""

    verdict: Verdict
    inputs: dict[str, torch.Tensor]
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None

    @property
    def block(self) -> int:
        """The disputed block's index in the model."""
        return self.verdict.first_block + self.verdict.block


def _label(record: swarm_pb2.VerdictRecord) -> str:
    return record.author or "an unnamed author"


def check_verdict_record(record: swarm_pb2.VerdictRecord, span: LlamaSpan) -> tuple[str, ...]:
    """The peer ids a verdict record convicts, once it checks out: each party's commit statement is signed
    by that party and names the evidence's root, the inputs, mask and positions are the committed ones,
    and recomputing the operator with `span`'s weights convicts exactly the record's losers.

    `span` must hold the verdict's block (first_block + block in the model): one block is enough.

    :raises FalseVerdict: it does not check out (its author is to be banned)
    :raises ValueError: `span` lacks the verdict's block (the caller's mistake, not the author's)
    """
    return _recompute_claim(record, read_claim(record), span)


def read_claim(record: swarm_pb2.VerdictRecord) -> VerdictClaim:
    """Decode a record and check everything but the recomputation (signatures, roots, mask, positions,
    the block within the signed span). Cheap: no weights needed.

    :raises FalseVerdict: it does not check out
    """
    try:
        check_message(record)
        return _decode_claim(record)
    except (ValueError, InvalidStatement) as e:  # RecordError and BadTensorError are ValueErrors too
        raise FalseVerdict(_label(record), str(e)) from None


def _recompute_claim(
    record: swarm_pb2.VerdictRecord, claim: VerdictClaim, span: LlamaSpan
) -> tuple[str, ...]:
    """The record's losers if recomputing its operator with `span`'s weights convicts exactly them."""
    block = claim.block
    if not span.start <= block < span.end:
        raise ValueError(f"the span [{span.start}, {span.end}) lacks the verdict's block {block}")
    try:
        holds = recheck_verdict(claim.verdict, span, claim.inputs, claim.attention_mask, claim.position_ids)
    except Exception as e:  # inputs the committed digests vouch for, yet the operator refuses them
        raise FalseVerdict(
            _label(record), f"the operator does not recompute from the inputs: {e!r}"
        ) from None
    if not holds:
        raise FalseVerdict(
            _label(record),
            f"recomputing {claim.verdict.op} of block {block} does not convict exactly its losers",
        )
    return tuple(record.losers)


def _decode_claim(record: swarm_pb2.VerdictRecord) -> VerdictClaim:
    """Decode a record and check everything but the recomputation; raises ValueError / InvalidStatement."""
    if record.op not in OPERATORS:
        raise ValueError(f"unknown operator {record.op!r}")
    if bad := {reason for reason in record.reasons.values() if reason not in REASONS}:
        raise ValueError(f"reasons {sorted(bad)} can't be proven by recomputation")
    evidence = evidence_from_bytes(record.evidence)
    if set(record.inputs) != set(OPERATOR_INPUTS[record.op]):
        raise ValueError(
            f"{record.op} reads {OPERATOR_INPUTS[record.op]}, the record has {sorted(record.inputs)}"
        )
    inputs = {
        name: deserialize_checked(
            proto, name=f"input {name}", allowed_dtypes=FLOAT_DTYPES, ndim=None, max_bytes=MAX_VERDICT_BYTES
        )
        for name, proto in record.inputs.items()
    }
    mask = _index_tensor(record, "attention_mask")
    positions = _index_tensor(record, "position_ids")
    _check_parties(record, evidence, mask, positions)
    label = dict(zip(record.parties, PARTIES, strict=True))
    verdict = Verdict(
        losers=tuple(name for name in PARTIES if name in {label[peer] for peer in record.losers}),
        reasons={label[peer]: reason for peer, reason in record.reasons.items()},
        rounds=record.rounds,
        bytes_moved=record.bytes_moved,
        first_block=record.first_block,
        block=record.block,
        op=record.op,
        evidence=evidence,
    )
    return VerdictClaim(verdict, inputs, mask, positions)


def _index_tensor(record: swarm_pb2.VerdictRecord, name: str) -> torch.Tensor | None:
    if not record.HasField(name):
        return None
    proto = getattr(record, name)
    return deserialize_checked(
        proto, name=name, allowed_dtypes=INDEX_DTYPES, ndim=2, max_bytes=MAX_VERDICT_BYTES
    ).to(torch.int64)


def _check_parties(
    record: swarm_pb2.VerdictRecord,
    evidence: Evidence,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> None:
    """Each party signed a commitment to this model's span whose root is the evidence's, on this mask and
    these positions: the proof that the roots, and so the losses, are the parties' own."""
    mask_digest, positions_digest = index_digest(attention_mask), index_digest(position_ids)
    spans = set()
    for name, peer, blob in zip(PARTIES, record.parties, record.signed_commits, strict=True):
        claim = open_commit(blob)
        if claim.signer != peer:
            raise InvalidStatement(f"party {name}'s commitment is signed by {claim.signer}, not by {peer}")
        if claim.model != record.model:
            raise InvalidStatement(f"party {name} committed to a forward of {claim.model!r}")
        if claim.operator_root != evidence.roots[name]:
            raise InvalidStatement(f"the evidence's root for party {name} is not the one {peer} signed")
        if claim.input_digest != evidence.span_input_digest or claim.num_leaves != evidence.num_leaves:
            raise InvalidStatement(f"party {name} signed another input or span size than the evidence's")
        if (claim.attention_mask, claim.position_ids) != (mask_digest, positions_digest):
            raise InvalidStatement(f"{peer} was sent another attention mask or positions than the record's")
        spans.add((claim.start, claim.end))
    if len(spans) != 1:
        raise InvalidStatement("the parties committed to different spans")
    ((start, end),) = spans
    if record.first_block != start or not 0 <= record.block < end - start:
        block = record.first_block + record.block
        raise ValueError(f"block {block} is not in the signed span [{start}, {end})")
    if evidence.num_leaves != (end - start) * len(OPERATORS):
        raise ValueError(f"{end - start} blocks do not have {evidence.num_leaves} operator outputs")


# ---- the DHT ---------------------------------------------------------------------------------------------


def publish_verdict(
    dht: DHT,
    model: str,
    record: swarm_pb2.VerdictRecord,
    expiration_s: float,
    *,
    owner_public_key: bytes,
    timeout: float = 10.0,
) -> bool:
    """Store `record` under `{model}.verdicts` in this peer's signed owner subkey (the key create_dht's
    signer holds: `signer.local_public_key`), tagged by whom it convicts: a verdict replaces this peer's
    earlier one against the same peers only. Returns whether the DHT took it within `timeout` s.

    The record's author is this peer: filled in if empty, refused (ValueError) if it names another.
    """
    peer_id = dht.peer_id.to_base58()
    if record.model != model:
        raise ValueError(f"a verdict about {record.model!r} does not belong under {model!r}")
    if record.author not in ("", peer_id):
        raise ValueError(f"this peer ({peer_id}) can't publish a verdict in {record.author}'s name")
    mine = swarm_pb2.VerdictRecord()
    mine.CopyFrom(record)
    mine.author = peer_id
    check_record_size(mine)
    tag = hashlib.sha256(",".join(sorted(mine.losers)).encode()).hexdigest()[:16]
    return store_records(
        dht, owner_public_key, peer_id, [(verdicts_key(model), mine)], expiration_s, timeout=timeout, tag=tag
    )


async def _get_latest(_dht, node, key: str):
    # runs inside the DHT process, so it must be a picklable module-level function
    return await node.get(key, latest=True)


def read_verdicts(dht: DHT, model: str, timeout: float = 10.0) -> list[tuple[str, swarm_pb2.VerdictRecord]]:
    """(author's peer id, record) for every verdict about `model` in the DHT. Records that don't decode,
    aren't verdicts about `model`, or whose subkey owner is not their author are dropped."""
    get = partial(_get_latest, key=verdicts_key(model))
    found = dht.run_coroutine(get, return_future=True).result(timeout)
    if found is None or not isinstance(found.value, dict):
        return []
    verdicts = []
    for subkey, item in found.value.items():
        owner = split_owner_subkey(subkey)
        try:
            record = decode_record(item.value)
        except RecordError:
            continue
        if owner is None or not isinstance(record, swarm_pb2.VerdictRecord):
            continue
        if record.author == owner[0] and record.model == model:
            verdicts.append((record.author, record))
    return verdicts


# ---- judging ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Judgement:
    """What one verdict record led to: the peers it convicts, or its author banned (with why)."""

    author: str
    convicted: tuple[str, ...]
    block: int | None  # in the model
    op: str
    reasons: dict[str, str]
    false_because: str | None = None


class VerdictBook:
    """The verdicts about one model that this peer has re-checked: who they convict, and which authors
    published false ones. Each distinct record is re-checked once.

    :param model: records about another model are refused (ValueError)
    :param num_blocks: the model's blocks, if known: a verdict about a block beyond them is false
    """

    def __init__(self, model: str, num_blocks: int | None = None):
        self.model, self.num_blocks = model, num_blocks
        self._seen: dict[bytes, Judgement] = {}
        self._convicted: dict[str, list[Judgement]] = {}
        self._false_authors: dict[str, Judgement] = {}

    def consider(
        self,
        author: str,
        record: swarm_pb2.VerdictRecord | bytes,
        span_loader: Callable[[int], LlamaSpan],
    ) -> Judgement | None:
        """Re-check a record published by `author` (its DHT subkey's owner) unless seen before; returns
        what it led to, or None for a record already judged or by an author already banned.

        `span_loader(block)` returns a span holding that model block's weights. If it raises, the error
        propagates and the record will be judged again next time.
        """
        if author in self._false_authors:
            return None  # a proven liar's records cost nothing more
        try:
            if isinstance(record, bytes):
                record = decode_verdict(author, record)
            elif record.author != author:
                raise FalseVerdict(author, f"the record names {record.author!r} as its author")
        except FalseVerdict as false:
            return self._ban_author(author, None, "", false.reason)
        if record.model != self.model:
            raise ValueError(f"a verdict about {record.model!r} given to the book of {self.model!r}")
        key = record_digest(record)
        if key in self._seen:
            return None
        block = record.first_block + record.block
        try:
            claim = read_claim(record)  # before any weights are loaded: most false records stop here
            if self.num_blocks is not None and block >= self.num_blocks:
                raise FalseVerdict(author, f"the model has no block {block}")
            convicted = _recompute_claim(record, claim, span_loader(block))
        except FalseVerdict as false:
            judgement = self._ban_author(author, block, record.op, false.reason)
        else:
            judgement = Judgement(author, convicted, block, record.op, dict(record.reasons))
            for peer in convicted:
                self._convicted.setdefault(peer, []).append(judgement)
            logger.warning("verdict by %s convicts %s (block %d, %s)", author, convicted, block, record.op)
        self._seen[key] = judgement
        return judgement

    def _ban_author(self, author: str, block: int | None, op: str, why: str) -> Judgement:
        judgement = Judgement(author, (), block, op, {}, false_because=why)
        self._false_authors.setdefault(author, judgement)
        logger.warning("banned %s for a false verdict: %s", author, why)
        return judgement

    def convicted(self) -> set[str]:
        """Peers convicted by a verdict that checked out."""
        return set(self._convicted)

    def false_authors(self) -> set[str]:
        """Authors of verdicts that did not check out."""
        return set(self._false_authors)

    def banned(self) -> set[str]:
        """Everyone to stop trusting: convicted peers and authors of false verdicts."""
        return self.convicted() | self.false_authors()

    def verdicts_against(self, peer: str) -> list[dict[str, Any]]:
        """What this book holds against `peer` (for `swarm health --json`): dicts with "against", "block"
        (in the model), "op", "by" (the verdict's author) and "reason" ("false_verdict" when `peer` is the
        author of a false verdict, then "by" is `peer` itself)."""
        found = [
            {
                "against": peer,
                "block": judgement.block,
                "op": judgement.op,
                "by": judgement.author,
                "reason": judgement.reasons.get(peer, ""),
            }
            for judgement in self._convicted.get(peer, ())
        ]
        if (false := self._false_authors.get(peer)) is not None:
            found.append(
                {
                    "against": peer,
                    "block": false.block,
                    "op": false.op,
                    "by": peer,
                    "reason": "false_verdict",
                    "detail": false.false_because,
                }
            )
        return found


def judge_verdicts(
    dht: DHT,
    model: str,
    book: VerdictBook,
    load_block: Callable[[int], LlamaSpan | None],
    profile: Mapping[str, str],
    timeout: float = 10.0,
) -> list[tuple[str, swarm_pb2.VerdictRecord]]:
    """Read `model`'s verdicts from the DHT and re-check in `book` those this peer can: the ones whose
    referee recomputed with `profile` (what this process computes under deterministic_profile(), which
    the re-check runs under) and whose block `load_block` has (None: not here). Returns the records it
    could not judge; the next call tries them again.
    """
    unjudged = []
    for author, record in read_verdicts(dht, model, timeout):
        if dict(record.profile) != dict(profile):
            unjudged.append((author, record))  # another profile could round differently: not ours to judge
            continue
        try:
            with deterministic_profile():
                book.consider(author, record, partial(_required_block, load_block))
        except Exception as e:  # no weights of that block here, say
            logger.debug("verdict by %s not judged: %r", author, e)
            unjudged.append((author, record))
    return unjudged


def _required_block(load_block: Callable[[int], LlamaSpan | None], block: int) -> LlamaSpan:
    span = load_block(block)
    if span is None:
        raise LookupError(f"no weights of block {block} here to re-check a verdict with")
    return span
