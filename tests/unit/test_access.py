"""Private swarms: key files and rotation, sealed DHT values, membership proofs carried in requests."""

import json
import os
import time

import pytest
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils.crypto import RSAPrivateKey

from swarm.access import keys as keys_module
from swarm.access.keys import (
    Keyring,
    SwarmKeyError,
    create_key_file,
    load_keyring,
    read_key_file,
    rotate_key_file,
)
from swarm.access.membership import PROOF_FIELD, proof_bytes, take_proofs, with_proofs
from swarm.access.records import MAGIC, EncryptedRecordValidator
from swarm.dht.factory import make_validators
from swarm.local import run_cli
from swarm.proto import swarm_pb2


def test_key_files_init_rotate_and_errors(tmp_path, monkeypatch):
    path = tmp_path / "swarm.key"
    first = create_key_file(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert read_key_file(path) == first and first.accepted() == [first.current]
    with pytest.raises(SwarmKeyError, match="exists already"):
        create_key_file(path)

    rotated = rotate_key_file(path, grace=60)
    assert rotated.previous == first.current and rotated.current != first.current
    assert read_key_file(path).accepted() == [rotated.current, first.current]
    assert rotated.accepted(now=rotated.previous_until + 1) == [rotated.current]

    monkeypatch.delenv(keys_module.SWARM_KEY_ENV, raising=False)
    assert load_keyring() is None  # no key: a public swarm
    monkeypatch.setenv(keys_module.SWARM_KEY_ENV, str(path))
    assert load_keyring().keys() == rotated
    with pytest.raises(SwarmKeyError, match="does not exist"):
        load_keyring(tmp_path / "missing.key")
    (tmp_path / "bad.key").write_text(json.dumps({"swarm_key": 1, "current": "c2hvcnQ="}))
    with pytest.raises(SwarmKeyError, match="32 bytes"):
        load_keyring(tmp_path / "bad.key")


def test_a_keyring_rereads_its_file_after_a_rotation(tmp_path, monkeypatch):
    monkeypatch.setattr(keys_module, "RELOAD_PERIOD", 0.0)
    path = tmp_path / "swarm.key"
    first = create_key_file(path)
    keyring = Keyring.from_file(path)
    rotated = rotate_key_file(path, grace=0.5)
    assert keyring.write_key() == rotated.current and keyring.accepted() == [rotated.current, first.current]
    time.sleep(0.6)
    assert keyring.accepted() == [rotated.current]
    path.write_text("{half a file")  # copied by hand: the last good keys stay
    assert keyring.write_key() == rotated.current


def _validators(keyring):
    return CompositeValidator(make_validators(RSAPrivateKey(), keyring))


def _record(value: bytes) -> DHTRecord:
    return DHTRecord(key=b"model.0", subkey=b"some-subkey", value=value, expiration_time=time.time() + 60)


def test_values_are_sealed_and_only_members_open_them(tmp_path):
    create_key_file(tmp_path / "a.key")
    create_key_file(tmp_path / "b.key")
    member, other = Keyring.from_file(tmp_path / "a.key"), Keyring.from_file(tmp_path / "b.key")
    writer, reader = _validators(member), _validators(member)
    record = _record(b"\x81\xa1x\x01")  # any msgpack value
    sealed = writer.sign_value(record)
    assert sealed.startswith(MAGIC) and b"\x81\xa1x\x01" not in sealed
    stored = DHTRecord(record.key, record.subkey, sealed, record.expiration_time)
    assert reader.validate(stored) and reader.strip_value(stored) == record.value

    assert not _validators(other).validate(stored)  # another swarm's key
    assert not _validators(None).validate(stored)  # a public peer drops sealed values too
    assert not reader.validate(record)  # an outsider's plain value
    for moved in (
        DHTRecord(b"model.1", record.subkey, sealed, record.expiration_time),  # to another key
        DHTRecord(record.key, record.subkey, sealed, record.expiration_time + 3600),  # kept alive longer
        DHTRecord(record.key, record.subkey, sealed[:-1] + bytes([sealed[-1] ^ 1]), record.expiration_time),
    ):
        assert not reader.validate(moved)
    assert EncryptedRecordValidator(member).merge_with(EncryptedRecordValidator(other))


def test_membership_proofs_ride_in_an_undeclared_field(tmp_path):
    create_key_file(tmp_path / "a.key")
    keyring = Keyring.from_file(tmp_path / "a.key")
    me, someone = PeerID.from_base58("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"), b"other-peer"
    request = swarm_pb2.InfoRequest()
    proven = with_proofs(request, proof_bytes(keyring.proofs(me.to_bytes())))
    assert request.ByteSize() == 0  # the caller's own message is untouched
    received = swarm_pb2.InfoRequest.FromString(proven.SerializeToString())
    proofs = take_proofs(received)
    assert received.SerializeToString() == b""  # the handler sees the request without them
    assert keyring.check_proofs(me.to_bytes(), proofs)
    assert not keyring.check_proofs(someone, proofs)  # bound to the peer id libp2p authenticated
    assert not keyring.check_proofs(me.to_bytes(), [])
    assert PROOF_FIELD < 2**29


def test_keys_cli_and_a_missing_swarm_key(tmp_path):
    def cli(*args):
        return run_cli(list(args), timeout=120)

    path = tmp_path / "swarm.key"
    made = cli("keys", "init", "--out", str(path))
    assert made.returncode == 0, made.stderr
    first = read_key_file(path)
    rotated = cli("keys", "rotate", "--key", str(path), "--grace", "30")
    assert rotated.returncode == 0 and "accepted until" in rotated.stdout
    assert read_key_file(path).previous == first.current
    missing = cli(
        "health", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--swarm-key", str(tmp_path / "no.key")
    )
    assert missing.returncode == 1 and "swarm keys init" in missing.stderr
