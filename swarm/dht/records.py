"""Record values: protobuf messages from proto/swarm.proto in a tagged envelope, and their DHT validator.

Values are msgpack maps {"swarm": kind, "data": serialized proto}. The validator rejects a swarm record
that does not parse, breaks the schema, or is not under an owner-protected subkey "{peer_id}[owner:KEY]"
where peer_id is the libp2p id of KEY and the record's own peer id (a verdict's author);
hivemind's RSASignatureValidator (which runs first) rejects one not signed by KEY. So no peer can write,
overwrite or expire a record in another peer's name.
"""

from __future__ import annotations

import enum
import math
from typing import Any

from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer

from swarm.access.records import MAGIC as SEALED_MAGIC
from swarm.dht.identity import peer_id_from_owner_marker
from swarm.dht.keys import check_model_name, split_owner_subkey
from swarm.proto import swarm_pb2

ENVELOPE_TAG = "swarm"
# weights as a node loaded them: its dtype's, or bitsandbytes' int8 / nf4
QUANT_NAMES = ("none", "int8", "nf4")
# a node behind NAT is reached through a relay: every step crosses two links and the relay's daemon. Routing
# and placement discount its throughput by this factor, as Petals does; measured here (benchmarks/relay.py) a
# relayed hop costs about as much as a direct one with twice the round-trip time, see the README
RELAYED_THROUGHPUT_FACTOR = 0.2
MAX_RECORD_BYTES = 64 * 1024
MAX_PROFILE_ENTRIES = 16
# a verdict carries the disputed operator's input tensors, so it gets more room than a node's records
MAX_VERDICT_RECORD_BYTES = 1024 * 1024
MAX_VERDICT_INPUTS = 8  # an operator reads at most a handful of tensors (attention: q, k, v)
MAX_NAME_LENGTH = 128
MAX_RELAY_MADDRS = 4  # a node behind NAT holds slots on a couple of relays
MAX_FINGERPRINT = 16
_HEX = set("0123456789abcdef")


class RecordKind(enum.StrEnum):
    SERVER_INFO = "server_info"
    MODEL_INFO = "model_info"
    STAGE_INFO = "stage_info"
    TRAINER_INFO = "trainer_info"
    VERDICT = "verdict"


_MESSAGES = {
    RecordKind.SERVER_INFO: swarm_pb2.ServerInfo,
    RecordKind.MODEL_INFO: swarm_pb2.ModelInfo,
    RecordKind.STAGE_INFO: swarm_pb2.StageInfo,
    RecordKind.TRAINER_INFO: swarm_pb2.TrainerInfo,
    RecordKind.VERDICT: swarm_pb2.VerdictRecord,
}
_MAX_BYTES = {RecordKind.VERDICT: MAX_VERDICT_RECORD_BYTES}
_KINDS = {message: kind for kind, message in _MESSAGES.items()}
# records that name their owner: the signing peer must be the peer they describe
_OWNED = (swarm_pb2.ServerInfo, swarm_pb2.StageInfo, swarm_pb2.TrainerInfo)
Record = (
    swarm_pb2.ServerInfo
    | swarm_pb2.ModelInfo
    | swarm_pb2.StageInfo
    | swarm_pb2.TrainerInfo
    | swarm_pb2.VerdictRecord
)


def owner_of(message: Record) -> str | None:
    """The peer a record speaks for, who alone may sign it; None for records anyone may write (ModelInfo)."""
    if isinstance(message, swarm_pb2.VerdictRecord):
        return message.author
    return message.peer_id if isinstance(message, _OWNED) else None


class RecordError(ValueError):
    """A swarm DHT record that breaks the schema."""


def encode_record(message: Record) -> dict[str, Any]:
    """Wrap a record message into the DHT value envelope (after checking it)."""
    kind = _KINDS[type(message)]
    check_message(message)
    data = message.SerializeToString()
    max_bytes = _MAX_BYTES.get(kind, MAX_RECORD_BYTES)
    if len(data) > max_bytes:  # every reader would refuse it
        raise RecordError(f"a {kind.value} record of {len(data)} bytes exceeds the limit of {max_bytes}")
    return {ENVELOPE_TAG: kind.value, "data": data}


def decode_record(value: Any) -> Record:
    """Parse and check an envelope; raise RecordError on anything malformed."""
    if not isinstance(value, dict) or set(value) != {ENVELOPE_TAG, "data"}:
        raise RecordError("not a swarm record envelope")
    try:
        kind = RecordKind(value[ENVELOPE_TAG])
    except ValueError:
        raise RecordError(f"unknown record kind {value[ENVELOPE_TAG]!r}") from None
    data = value["data"]
    max_bytes = _MAX_BYTES.get(kind, MAX_RECORD_BYTES)
    if not isinstance(data, bytes) or len(data) > max_bytes:
        raise RecordError(f"{kind.value} record data must be at most {max_bytes} bytes")
    message = _MESSAGES[kind]()
    try:
        message.ParseFromString(data)
    except Exception as e:
        raise RecordError(f"record does not parse as {kind.value}: {e}") from None
    check_message(message)
    return message


def is_swarm_envelope(value: Any) -> bool:
    return isinstance(value, dict) and ENVELOPE_TAG in value


def _check_hashes(hashes, expected: int, what: str) -> None:
    if len(hashes) != expected:
        raise RecordError(f"{what}: expected {expected} block hashes, got {len(hashes)}")
    for h in hashes:
        if len(h) != 64 or not set(h) <= _HEX:
            raise RecordError(f"{what}: block hash {h!r} is not a sha256 hex digest")


def _check_rate(value: float, name: str) -> None:
    if not math.isfinite(value) or value < 0:
        raise RecordError(f"{name} must be a finite non-negative number, got {value}")


def _check_training(message: swarm_pb2.StageInfo | swarm_pb2.TrainerInfo) -> None:
    if not message.peer_id or not message.run_id:
        raise RecordError("training records need peer_id and run_id")
    if message.state not in swarm_pb2.ServerInfo.State.values():
        raise RecordError(f"unknown state {message.state}")
    if len(message.run_hash) != 64 or not set(message.run_hash) <= _HEX:
        raise RecordError("run_hash must be a sha256 hex digest")
    if len(message.fingerprint) > MAX_FINGERPRINT or not all(math.isfinite(v) for v in message.fingerprint):
        raise RecordError(f"fingerprint must hold at most {MAX_FINGERPRINT} finite numbers")
    if isinstance(message, swarm_pb2.StageInfo):
        if message.end_block <= message.start_block:
            raise RecordError(f"empty stage [{message.start_block}, {message.end_block})")
        _check_rate(message.throughput, "throughput")
    else:
        _check_rate(message.samples_per_s, "samples_per_s")


def _check_verdict(message: swarm_pb2.VerdictRecord) -> None:
    """The verdict's shape; whether it is true is for swarm.verification.verdicts to re-check."""
    try:
        check_model_name(message.model)
    except ValueError as e:
        raise RecordError(str(e)) from None
    parties = list(message.parties)
    if not message.author or len(parties) != 2 or len(set(parties)) != 2 or not all(parties):
        raise RecordError("a verdict needs its author and two distinct parties")
    if len(message.signed_commits) != 2:
        raise RecordError("a verdict needs each party's signed statement over its commitment")
    losers = list(message.losers)
    if not losers or len(set(losers)) != len(losers) or not set(losers) <= set(parties):
        raise RecordError("a verdict's losers must be distinct parties, at least one")
    if set(message.reasons) != set(losers):
        raise RecordError("a verdict needs one reason per loser")
    if not 0 < len(message.op) <= MAX_NAME_LENGTH or not message.evidence:
        raise RecordError("a verdict needs the disputed operator and the evidence")
    if not 0 < len(message.inputs) <= MAX_VERDICT_INPUTS:
        raise RecordError(f"a verdict carries 1 to {MAX_VERDICT_INPUTS} input tensors")
    if len(message.profile) > MAX_PROFILE_ENTRIES or any(
        len(key) > 64 or len(value) > 256 for key, value in message.profile.items()
    ):
        raise RecordError(f"a verdict's profile has at most {MAX_PROFILE_ENTRIES} short entries")
    _check_rate(message.timestamp, "timestamp")


def check_message(message: Record) -> None:
    """Schema rules the protobuf types alone can't express."""
    if isinstance(message, swarm_pb2.VerdictRecord):
        _check_verdict(message)
    elif isinstance(message, swarm_pb2.StageInfo | swarm_pb2.TrainerInfo):
        _check_training(message)
    elif isinstance(message, swarm_pb2.ServerInfo):
        if not message.peer_id or not message.model:
            raise RecordError("server info needs peer_id and model")
        if message.state not in swarm_pb2.ServerInfo.State.values():
            raise RecordError(f"unknown state {message.state}")
        if message.end_block <= message.start_block:
            raise RecordError(f"empty span [{message.start_block}, {message.end_block})")
        for name in ("throughput", "inference_rps", "forward_rps"):
            _check_rate(getattr(message, name), name)
        for peer, rtt in message.next_pings.items():
            _check_rate(rtt, f"next_pings[{peer}]")
        _check_hashes(message.block_hashes, message.end_block - message.start_block, "server info")
        if len(message.relay_maddrs) > MAX_RELAY_MADDRS or not all(
            0 < len(m) <= MAX_NAME_LENGTH * 2 and m.endswith("/p2p-circuit") for m in message.relay_maddrs
        ):
            raise RecordError(f"relay_maddrs: at most {MAX_RELAY_MADDRS} short /p2p-circuit addresses")
        if message.quant not in ("", *QUANT_NAMES):
            raise RecordError(f"unknown quant {message.quant[:32]!r}; known: {list(QUANT_NAMES)}")
    else:
        if not message.model or message.num_blocks == 0 or message.hidden_size == 0:
            raise RecordError("model info needs model, num_blocks and hidden_size")
        _check_hashes(message.block_hashes, message.num_blocks, "model info")


class SwarmRecordValidator(RecordValidatorBase):
    """Rejects swarm records that break the schema or are not bound to their owner's subkey.

    Runs after RSASignatureValidator, so it sees values with the signature stripped.
    Values that are not swarm envelopes are left to other validators (e.g. averaging metadata).
    """

    def validate(self, record: DHTRecord) -> bool:
        if record.value.startswith(SEALED_MAGIC):
            return False  # a private swarm's value that no key of ours opened (swarm.access.records)
        try:
            value = MSGPackSerializer.loads(record.value)
        except Exception:
            return True  # not ours: hivemind's own validators decide
        if not is_swarm_envelope(value):
            return True
        try:
            message = decode_record(value)
            subkey = MSGPackSerializer.loads(record.subkey) if record.subkey else None
        except Exception:
            return False
        owner = split_owner_subkey(subkey)
        if owner is None:
            return False  # unsigned swarm records are never accepted
        peer_id, marker = owner
        if peer_id_from_owner_marker(marker) != peer_id:
            return False  # the subkey's peer id must be the signing key's own
        speaks_for = owner_of(message)
        return speaks_for is None or speaks_for == peer_id

    @property
    def priority(self) -> int:
        return 5  # below RSASignatureValidator (10), so the signature is checked first and stripped

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SwarmRecordValidator)
