"""Verdicts between real processes: two node processes (one lying by an ulp in block 2's down_proj) sign
their commitments with their identity keys, a referee convicts the liar and publishes the verdict in the
DHT, and another peer reads it, re-checks it with one block's weights and convicts the liar itself; a forged
verdict gets its author banned, and nobody can publish a verdict in another's name."""

from __future__ import annotations

import time

import pytest
import torch
from hivemind.utils.timed_storage import get_dht_time
from verification_helpers import padded_request, start_named_nodes

from swarm.client.remote import remote_forward
from swarm.dht.factory import create_dht
from swarm.dht.keys import owner_subkey, verdicts_key
from swarm.dht.records import encode_record
from swarm.local import LocalSwarm
from swarm.models.checkpoint import resolve_checkpoint
from swarm.models.span import load_span
from swarm.proto import swarm_pb2
from swarm.utils.aio import BackgroundLoop
from swarm.verification.determinism import deterministic_profile
from swarm.verification.dispute import Question
from swarm.verification.remote import remote_commit, run_remote_dispute
from swarm.verification.verdicts import (
    VerdictBook,
    check_commit_signature,
    make_verdict_record,
    publish_verdict,
    read_verdicts,
)

HIDDEN = 64
TIMEOUT = 30
SPAN = (1, 4)
PERTURBED_BLOCK, PERTURBED_OP = 2, "down_proj"
NUM_BLOCKS = 6  # the tiny_model fixture's


@pytest.fixture(scope="module")
def nodes(tiny_model, tmp_path_factory):
    """A bootstrap peer and two deterministic nodes on blocks [1, 4): one honest, one lying by an ulp."""
    swarm = LocalSwarm(workdir=tmp_path_factory.mktemp("verdict-swarm"))
    try:
        swarm.start_bootstrap()
        flags = {"honest": (), "cheater": ("--fault", f"perturb:block={PERTURBED_BLOCK},op={PERTURBED_OP}")}
        processes = start_named_nodes(swarm, tiny_model, SPAN, flags, "--throughput", "1")
        yield swarm, processes
    finally:
        swarm.close()


@pytest.fixture(scope="module")
def peers(nodes):
    """The referee (a full DHT peer with its P2P), a forger and a reader (client mode)."""
    swarm, _ = nodes
    loop = BackgroundLoop()
    referee, referee_signer = create_dht(swarm.initial_peers)
    forger, forger_signer = create_dht(swarm.initial_peers)
    reader, _ = create_dht(swarm.initial_peers, client_mode=True)
    p2p = loop.run(referee.replicate_p2p())
    yield {
        "loop": loop,
        "p2p": p2p,
        "referee": (referee, referee_signer),
        "forger": (forger, forger_signer),
        "reader": reader,
    }
    loop.run(p2p.shutdown())
    for dht in (reader, forger, referee):
        dht.shutdown()
    loop.close()


@pytest.fixture(scope="module")
def model_name(tiny_model) -> str:
    return resolve_checkpoint(str(tiny_model)).name  # what nodes sign and announce


def commit(peers, process, request_id: str, signatures: list[bytes] | None = None):
    hidden, mask = padded_request(HIDDEN)
    call = remote_commit(
        peers["p2p"], process.peer_id, request_id, *SPAN, hidden, mask, None, TIMEOUT, signatures=signatures
    )
    return peers["loop"].run(call)


def test_a_node_signs_its_commitment_with_its_identity(nodes, peers, model_name):
    _, processes = nodes
    honest, cheater = processes["honest"], processes["cheater"]
    signatures: list[bytes] = []
    commitment, output = commit(peers, honest, "signed", signatures)
    assert len(signatures) == 1
    assert check_commit_signature(signatures[0], commitment, model=model_name) == honest.peer_id
    # the signed commit is the ordinary one: same output as a plain forward
    hidden, mask = padded_request(HIDDEN)
    forward = peers["loop"].run(
        remote_forward(peers["p2p"], honest.peer_id, *SPAN, hidden, mask, None, TIMEOUT)
    )
    assert torch.equal(forward, output)
    # the cheater's statement is its own, and about its own (different) commitment
    other: list[bytes] = []
    lie, _ = commit(peers, cheater, "signed", other)
    assert check_commit_signature(other[0], lie) == cheater.peer_id != honest.peer_id
    assert lie.operator_root != commitment.operator_root
    with pytest.raises(ValueError, match="another commitment"):
        check_commit_signature(other[0], commitment)


@pytest.fixture(scope="module")
def published(nodes, peers, model_name, tiny_model):
    """The referee disputes honest vs cheater, builds the verdict record and publishes it."""
    _, processes = nodes
    honest, cheater = processes["honest"], processes["cheater"]
    signatures: list[bytes] = []
    a, _ = commit(peers, honest, "disputed", signatures)
    b, _ = commit(peers, cheater, "disputed", signatures)
    loop, p2p = peers["loop"], peers["p2p"]
    _, mask = padded_request(HIDDEN)
    referee_span = load_span(resolve_checkpoint(str(tiny_model)), *SPAN)
    with deterministic_profile():
        verdict, parties = loop.run(
            run_remote_dispute(p2p, honest.peer_id, cheater.peer_id, referee_span, a, b, "disputed", mask)
        )
    assert verdict.losers == ("b",), parties["b"].failure
    # the operator's inputs, asked of a party once more (both agree on them: the game checked it)
    refs = tuple(verdict.evidence.input_refs.values())
    fetched = loop.run(parties["a"].respond(Question(verdict.rounds + 1, refs, tensors=True)))
    inputs = {name: fetched.tensors[ref] for name, ref in verdict.evidence.input_refs.items()}
    record = make_verdict_record(
        model_name,
        verdict,
        parties={"a": honest.peer_id, "b": cheater.peer_id},
        signed_commits={"a": signatures[0], "b": signatures[1]},
        input_tensors=inputs,
        attention_mask=mask,
        position_ids=None,
    )
    referee, signer = peers["referee"]
    record.author = referee.peer_id.to_base58()  # as publish_verdict fills it in
    assert publish_verdict(referee, model_name, record, 120, owner_public_key=signer.local_public_key)
    print(f"\nverdict record from real nodes: {record.ByteSize()} bytes")
    return record


def block_loader(tiny_model):
    checkpoint = resolve_checkpoint(str(tiny_model))
    return lambda block: load_span(checkpoint, block, block + 1)


def test_a_published_verdict_is_read_and_rechecked_by_another_peer(
    nodes, peers, published, model_name, tiny_model
):
    _, processes = nodes
    referee_id = peers["referee"][0].peer_id.to_base58()
    found = read_verdicts(peers["reader"], model_name, timeout=TIMEOUT)
    assert [author for author, _ in found] == [referee_id]
    ((author, record),) = found
    assert record.author == referee_id and list(record.losers) == [processes["cheater"].peer_id]
    book = VerdictBook(model_name, num_blocks=NUM_BLOCKS)
    with deterministic_profile():
        judgement = book.consider(author, record, block_loader(tiny_model))
    assert judgement.convicted == (processes["cheater"].peer_id,)
    assert book.banned() == {processes["cheater"].peer_id}
    (entry,) = book.verdicts_against(processes["cheater"].peer_id)
    assert (entry["block"], entry["op"], entry["by"]) == (PERTURBED_BLOCK, PERTURBED_OP, referee_id)
    assert book.verdicts_against(processes["honest"].peer_id) == []


def test_nobody_publishes_in_anothers_name_and_forgers_are_banned(
    nodes, peers, published, model_name, tiny_model
):
    _, processes = nodes
    honest, cheater = processes["honest"].peer_id, processes["cheater"].peer_id
    referee, referee_signer = peers["referee"]
    forger, forger_signer = peers["forger"]
    referee_id, forger_id = referee.peer_id.to_base58(), forger.peer_id.to_base58()
    key, expiration = verdicts_key(model_name), get_dht_time() + 120

    def store(record, subkey) -> bool:
        return forger.store(key, encode_record(record), expiration, subkey=subkey, return_future=True).result(
            TIMEOUT
        )

    # the referee's verdict under the forger's own subkey: its author is not the subkey's owner
    assert not store(published, owner_subkey(forger_id, forger_signer.local_public_key))
    # under the referee's subkey: the forger can't sign for the referee's key
    assert not store(published, owner_subkey(referee_id, referee_signer.local_public_key))
    with pytest.raises(ValueError, match="name"):
        publish_verdict(forger, model_name, published, 120, owner_public_key=forger_signer.local_public_key)

    # a forged verdict in the forger's own name is stored (it is well formed) but convicts only the forger
    framed = swarm_pb2.VerdictRecord()
    framed.CopyFrom(published)
    framed.author = ""
    framed.ClearField("losers")
    framed.losers.append(honest)
    framed.ClearField("reasons")
    framed.reasons[honest] = "wrong_output"
    assert publish_verdict(forger, model_name, framed, 120, owner_public_key=forger_signer.local_public_key)
    deadline = time.monotonic() + TIMEOUT
    while len(found := read_verdicts(peers["reader"], model_name, timeout=TIMEOUT)) < 2:
        assert time.monotonic() < deadline, found
        time.sleep(0.5)
    assert sorted(author for author, _ in found) == sorted([referee_id, forger_id])
    book = VerdictBook(model_name, num_blocks=NUM_BLOCKS)
    with deterministic_profile():
        for author, record in found:
            book.consider(author, record, block_loader(tiny_model))
    assert book.banned() == {cheater, forger_id}
    assert book.false_authors() == {forger_id} and honest not in book.banned()
