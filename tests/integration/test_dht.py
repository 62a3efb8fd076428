"""Signed, schema-checked, expiring DHT records between real hivemind peers on 127.0.0.1."""

import re
import subprocess
import sys
import threading
import time

import pytest
from hivemind.utils.timed_storage import get_dht_time

from swarm.dht.announcer import Announcer, store_node_records
from swarm.dht.factory import create_dht
from swarm.dht.identity import load_or_create_identity, peer_id_of
from swarm.dht.keys import block_key, owner_subkey
from swarm.dht.records import encode_record
from swarm.dht.swarm_view import read_swarm
from swarm.proto import swarm_pb2

MODEL = "signed-model"


def info(peer_id: str, start=0, end=2, throughput=5.0) -> swarm_pb2.ServerInfo:
    return swarm_pb2.ServerInfo(
        state=swarm_pb2.ServerInfo.ONLINE,
        peer_id=peer_id,
        model=MODEL,
        start_block=start,
        end_block=end,
        throughput=throughput,
        block_hashes=["a" * 64] * (end - start),
    )


@pytest.fixture
def peers():
    """A bootstrap peer, an honest peer A, an attacker B and a reader C, all with swarm validators."""
    boot, _ = create_dht()
    maddrs = [str(m) for m in boot.get_visible_maddrs()]
    a, a_signer = create_dht(maddrs)
    b, b_signer = create_dht(maddrs)
    c, _ = create_dht(maddrs, client_mode=True)
    yield (a, a_signer), (b, b_signer), c
    for dht in (c, b, a, boot):
        dht.shutdown()


def test_peer_cannot_overwrite_forge_or_delete_another_peers_record(peers):
    (a, a_signer), (b, b_signer), c = peers
    a_id, b_id = a.peer_id.to_base58(), b.peer_id.to_base58()
    assert store_node_records(a, a_signer.local_public_key, info(a_id), None, expiration=30)
    servers, _ = read_swarm(c, MODEL, 2)
    assert servers[a_id].throughput == 5.0

    key = block_key(MODEL, 0)
    a_subkey = owner_subkey(a_id, a_signer.local_public_key)
    expiration = get_dht_time() + 60
    # overwrite A's record (or "delete" it by marking it OFFLINE) without A's private key: refused
    for fake in (info(a_id, throughput=999.0), info(a_id, throughput=0.0)):
        fake.state = swarm_pb2.ServerInfo.OFFLINE if fake.throughput == 0 else fake.state
        assert not b.store(key, encode_record(fake), expiration, subkey=a_subkey)
    # forge a record in A's name under B's own owner key: refused by the schema validator
    assert not b.store(
        key,
        encode_record(info(a_id, throughput=999.0)),
        expiration,
        subkey=owner_subkey(a_id, b_signer.local_public_key),
    )
    # an unsigned swarm record: refused
    assert not b.store(key, encode_record(info(b_id)), expiration, subkey=b_id.encode())
    # a record that breaks the schema, even correctly signed: refused
    bad = {"swarm": "server_info", "data": info(b_id).SerializeToString()[:-5]}
    assert not b.store(key, bad, expiration, subkey=owner_subkey(b_id, b_signer.local_public_key))

    servers, _ = read_swarm(c, MODEL, 2)
    assert set(servers) == {a_id}
    assert servers[a_id].throughput == 5.0 and servers[a_id].state == swarm_pb2.ServerInfo.ONLINE

    # B may of course announce itself
    assert store_node_records(b, b_signer.local_public_key, info(b_id, 1, 2), None, expiration=30)
    servers, _ = read_swarm(c, MODEL, 2)
    assert set(servers) == {a_id, b_id}


def test_records_expire_and_announcer_keeps_them_alive(peers):
    (a, a_signer), (b, b_signer), c = peers
    a_id, b_id = a.peer_id.to_base58(), b.peer_id.to_base58()
    # A announces once with a 3 s lifetime; B runs the announcer loop with a 1 s period (3 s lifetime)
    assert store_node_records(a, a_signer.local_public_key, info(a_id), None, expiration=3)
    announcer = Announcer(b, b_signer.local_public_key, lambda: info(b_id), None, update_period=1.0)
    announcer.start()
    try:
        time.sleep(1.5)
        assert set(read_swarm(c, MODEL, 2)[0]) == {a_id, b_id}
        time.sleep(3.5)
        assert set(read_swarm(c, MODEL, 2)[0]) == {b_id}  # A expired, B re-announced
    finally:
        announcer.stop()
    time.sleep(3.5)
    assert read_swarm(c, MODEL, 2)[0] == {}


def test_identity_fixes_peer_id_and_signing_key(tmp_path):
    path = tmp_path / "node.id"
    dht, signer = create_dht(identity_path=path)
    try:
        peer_id = dht.peer_id.to_base58()
    finally:
        dht.shutdown()
    key = load_or_create_identity(path)
    assert peer_id_of(key) == peer_id
    assert signer.local_public_key == b"[owner:" + key.get_public_key().to_bytes() + b"]"
    again, _ = create_dht(identity_path=path)  # a restarted peer keeps its id
    try:
        assert again.peer_id.to_base58() == peer_id
    finally:
        again.shutdown()


def test_bootstrap_cli_prints_and_writes_maddrs(tmp_path):
    maddr_file = tmp_path / "maddrs"
    identity = tmp_path / "boot.id"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "swarm.cli.main",
            "dht",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--maddr-file",
            str(maddr_file),
            "--identity",
            str(identity),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        first_line = process.stdout.readline().strip()
        assert re.fullmatch(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/Qm\w+", first_line), first_line
        assert maddr_file.read_text().split()[0] == first_line
        # a peer can join through it
        joined, _ = create_dht([first_line], client_mode=True)
        joined.shutdown()
    finally:
        process.terminate()
        assert process.wait(20) == 0
    assert identity.exists()
    assert first_line.endswith(peer_id_of(load_or_create_identity(identity)))


def test_a_node_spanning_many_blocks_announces_without_breaking_the_dht_process(peers):
    """A ServerInfo stored under each of 60 blocks: hivemind's DHT process breaks on a pipe message above
    64 KiB, so the record must travel once, not once per block."""
    (a, a_signer), _, c = peers
    a_id = a.peer_id.to_base58()
    wide = info(a_id, 0, 60)
    assert len(encode_record(wide)["data"]) * 60 > 64 * 1024  # copied per block, it would not fit
    stop = threading.Event()

    def hold_the_gil():  # a busy parent (a node hashing its weights) writes the pipe in slow pieces
        while not stop.is_set():
            sum(range(10_000))

    busy = threading.Thread(target=hold_the_gil)
    busy.start()
    try:
        for _ in range(5):
            assert store_node_records(a, a_signer.local_public_key, wide, None, expiration=30)
    finally:
        stop.set()
        busy.join()
    assert a.is_alive()
    servers, _ = read_swarm(c, MODEL, 60)
    assert servers[a_id].end_block == 60


def test_values_above_16_kib_reach_the_dht_process_whole(peers):
    """multiprocessing sends a message above 16 KiB in two writes; hivemind's DHT process read its pipe
    non-blocking and died when it saw the first without the second (an accusation in a robust round)."""
    (a, _), _, c = peers
    stop = threading.Event()

    def hold_the_gil():  # a busy parent writes the pipe in slow pieces
        while not stop.is_set():
            sum(range(10_000))

    busy = threading.Thread(target=hold_the_gil)
    busy.start()
    try:
        values = [bytes([i]) * (40 * 1024) for i in range(8)]
        for i, value in enumerate(values):
            # bounded: a dead DHT process never answers
            assert a.store(f"big_{i}", value, get_dht_time() + 60, return_future=True).result(timeout=20)
    finally:
        stop.set()
        busy.join()
    assert a.is_alive()
    assert c.get("big_7", latest=True).value == values[7]
