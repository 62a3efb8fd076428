"""Record schemas: what the DHT validator accepts and refuses, without the network."""

import dataclasses

import pytest
from hivemind.dht.validation import DHTRecord
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer

from swarm.dht.identity import owner_marker, peer_id_of
from swarm.dht.keys import block_key, model_info_key, owner_subkey, split_owner_subkey
from swarm.dht.records import RecordError, SwarmRecordValidator, decode_record, encode_record
from swarm.proto import swarm_pb2

KEY = RSAPrivateKey()
OWNER = owner_marker(KEY)
PEER = peer_id_of(KEY)


def server_info(**overrides) -> swarm_pb2.ServerInfo:
    fields = dict(
        state=swarm_pb2.ServerInfo.ONLINE,
        peer_id=PEER,
        model="tiny-llama",
        start_block=1,
        end_block=3,
        throughput=10.0,
        block_hashes=["a" * 64, "b" * 64],
    )
    fields.update(overrides)
    return swarm_pb2.ServerInfo(**fields)


def record(value, subkey=owner_subkey(PEER, OWNER)) -> DHTRecord:
    return DHTRecord(
        key=b"k",
        subkey=MSGPackSerializer.dumps(subkey),
        value=MSGPackSerializer.dumps(value),
        expiration_time=1.0,
    )


def test_round_trip():
    info = server_info()
    assert decode_record(encode_record(info)) == info
    model = swarm_pb2.ModelInfo(model="m", num_blocks=2, hidden_size=8, block_hashes=["c" * 64] * 2)
    assert decode_record(encode_record(model)) == model


@pytest.mark.parametrize(
    "bad",
    [
        dict(end_block=1),  # empty span
        dict(block_hashes=["a" * 64]),  # one hash for two blocks
        dict(block_hashes=["zz" * 32, "b" * 64]),  # not hex
        dict(throughput=float("nan")),
        dict(throughput=-1.0),
        dict(peer_id=""),
    ],
)
def test_schema_violations_are_refused(bad):
    with pytest.raises(RecordError):
        encode_record(server_info(**bad))
    envelope = {"swarm": "server_info", "data": server_info(**bad).SerializeToString()}
    assert not SwarmRecordValidator().validate(record(envelope))


def test_validator_requires_owner_subkey_naming_the_same_peer():
    validator = SwarmRecordValidator()
    value = encode_record(server_info())
    assert validator.validate(record(value))
    assert not validator.validate(record(value, subkey=PEER.encode()))  # unsigned
    assert validator.validate(record(value, subkey=owner_subkey(PEER, OWNER, tag="ab12")))
    other = RSAPrivateKey()
    # someone else's peer id under this key, or this peer id under someone else's key: both forged
    assert not validator.validate(record(value, subkey=owner_subkey(peer_id_of(other), OWNER)))
    forged = encode_record(server_info(peer_id=peer_id_of(other)))
    assert not validator.validate(record(forged, subkey=owner_subkey(peer_id_of(other), OWNER)))
    assert not validator.validate(record(value, subkey=owner_subkey(PEER, owner_marker(other))))
    assert not validator.validate(record({"swarm": "server_info", "data": b"\xff\x00garbage"}))
    assert not validator.validate(record({"swarm": "unknown_kind", "data": b""}))
    # values that are not swarm envelopes are other subsystems' business
    assert validator.validate(dataclasses.replace(record(value), value=MSGPackSerializer.dumps([1, 2, 3])))


def test_keys():
    assert block_key("tiny-llama", 3) == "tiny-llama.3"
    assert model_info_key("tiny-llama") == "tiny-llama.info"
    assert split_owner_subkey(owner_subkey("peer", OWNER)) == ("peer", OWNER)
    # a tag keeps several records of one peer apart and still names the peer
    assert split_owner_subkey(owner_subkey("peer", OWNER, tag="ab12")) == ("peer", OWNER)
    assert owner_subkey("peer", OWNER, tag="ab12") != owner_subkey("peer", OWNER, tag="cd34")
    for bad_tag in ("a/b", "[owner:", "x y"):
        with pytest.raises(ValueError, match="tag"):
            owner_subkey("peer", OWNER, tag=bad_tag)
    assert split_owner_subkey(b"/tag" + OWNER) is None  # a tag without a peer id names nobody
    assert PEER.startswith("Qm")
    assert split_owner_subkey(b"peer") is None
    with pytest.raises(ValueError):
        block_key("bad name/with slash", 0)


def test_training_records_round_trip_and_refuse_bad_values():
    from swarm.dht.records import RecordError, decode_record, encode_record
    from swarm.proto import swarm_pb2

    stage = swarm_pb2.StageInfo(
        state=swarm_pb2.ServerInfo.ONLINE,
        peer_id="QmPeer",
        run_id="run",
        run_hash="a" * 64,
        stage=1,
        start_block=2,
        end_block=4,
        step=3,
        fingerprint=[0.1, 0.2, 0.3],
    )
    assert decode_record(encode_record(stage)) == stage
    trainer = swarm_pb2.TrainerInfo(peer_id="QmT", run_id="run", run_hash="b" * 64, samples_per_s=2.0)
    assert decode_record(encode_record(trainer)) == trainer
    for bad in (
        swarm_pb2.StageInfo(peer_id="QmPeer", run_id="run", run_hash="short", start_block=0, end_block=1),
        swarm_pb2.StageInfo(peer_id="QmPeer", run_id="run", run_hash="a" * 64, start_block=2, end_block=2),
        swarm_pb2.StageInfo(
            peer_id="QmPeer", run_id="run", run_hash="a" * 64, end_block=1, fingerprint=[float("nan")]
        ),
        swarm_pb2.TrainerInfo(peer_id="QmT", run_id="run", run_hash="b" * 64, samples_per_s=-1.0),
        swarm_pb2.TrainerInfo(run_id="run", run_hash="b" * 64),
    ):
        with pytest.raises(RecordError):
            encode_record(bad)
