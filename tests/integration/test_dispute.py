"""Verde's dispute game between real node processes over hivemind P2P: two deterministic nodes commit to
traces of the same forward, and when one lies by an ulp in one operator, a client referees the bisection
by RPC and pins the lie to that node, block and operator."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from verification_helpers import p2p_client, padded_request, start_named_nodes

from swarm.client.remote import remote_forward
from swarm.dht.factory import create_dht
from swarm.local import LocalSwarm
from swarm.models.checkpoint import resolve_checkpoint
from swarm.models.span import load_span
from swarm.proto import swarm_pb2
from swarm.protocol import VerificationProtocol
from swarm.verification.determinism import deterministic_profile
from swarm.verification.dispute import SPAN_INPUT, Question, recheck_verdict
from swarm.verification.remote import RemoteParty, remote_commit, run_remote_dispute
from swarm.verification.service import TraceStore
from swarm.verification.trace import OPERATORS

HIDDEN = 64
TIMEOUT = 30
SPAN = (1, 4)
PERTURBED_BLOCK = 2  # absolute
PERTURBED_OP = "down_proj"
MAX_ROUNDS = 2 + 4 + 2  # ceil(log2 3 blocks) + ceil(log2 13 operators) + inputs and fetch rounds


@pytest.fixture(scope="module")
def nodes(tiny_model, tmp_path_factory):
    """Three deterministic nodes on blocks [1, 4): two honest, one lying by an ulp in block 2's down_proj."""
    swarm = LocalSwarm(workdir=tmp_path_factory.mktemp("dispute-swarm"))
    try:
        swarm.start_bootstrap()
        flags = {
            "honest": (),
            "honest2": (),
            "cheater": ("--fault", f"perturb:block={PERTURBED_BLOCK},op={PERTURBED_OP}"),
        }
        processes = start_named_nodes(swarm, tiny_model, SPAN, flags, "--throughput", "1")
        yield swarm, processes
    finally:
        swarm.close()


@pytest.fixture(scope="module")
def client(nodes):
    swarm, _ = nodes
    with p2p_client(swarm.initial_peers) as loop_and_p2p:
        yield loop_and_p2p


def commit(client, process, request_id: str):
    loop, p2p = client
    hidden, mask = padded_request(HIDDEN)
    return loop.run(remote_commit(p2p, process.peer_id, request_id, *SPAN, hidden, mask, None, TIMEOUT))


def test_honest_nodes_commit_identically(nodes, client):
    _, processes = nodes
    (a, out_a), (b, out_b) = (commit(client, processes[name], "same") for name in ("honest", "honest2"))
    assert a == b  # same input, weights and profile: the same trace, leaf for leaf
    assert a.block_weight_digests == b.block_weight_digests and (a.start, a.end) == SPAN
    assert a.num_leaves == (SPAN[1] - SPAN[0]) * len(OPERATORS)
    assert torch.equal(out_a, out_b)
    # and the commit's output is the node's ordinary forward, bit for bit
    loop, p2p = client
    hidden, mask = padded_request(HIDDEN)
    forward = loop.run(remote_forward(p2p, processes["honest"].peer_id, *SPAN, hidden, mask, None, TIMEOUT))
    assert torch.equal(forward, out_a)
    # a part of the span commits to its own blocks only
    part, out_part = loop.run(
        remote_commit(p2p, processes["honest"].peer_id, "part", 2, 4, hidden, mask, None, TIMEOUT)
    )
    assert (part.start, part.end, part.num_leaves) == (2, 4, 2 * len(OPERATORS))
    assert part.block_weight_digests == a.block_weight_digests[1:]
    forward = loop.run(remote_forward(p2p, processes["honest"].peer_id, 2, 4, hidden, mask, None, TIMEOUT))
    assert torch.equal(forward, out_part)


def test_a_remote_dispute_convicts_the_perturbed_node(nodes, client, tiny_model):
    _, processes = nodes
    loop, p2p = client
    honest, cheater = processes["honest"], processes["cheater"]
    started = time.perf_counter()
    a, out_a = commit(client, honest, "disputed")
    b, out_b = commit(client, cheater, "disputed")
    assert a != b and a.input_digest == b.input_digest  # same input, different traces
    assert not torch.equal(out_a, out_b)
    # the cheater commits to what it serves: its lie (the fault's hook is on the traced span)
    hidden, mask = padded_request(HIDDEN)
    served = loop.run(remote_forward(p2p, cheater.peer_id, *SPAN, hidden, mask, None, TIMEOUT))
    assert torch.equal(served, out_b)
    # a one-block prefix of the span agrees: the lie is in block 2 (index 1)
    assert a.block_output_digests[0] == b.block_output_digests[0]
    assert a.block_output_digests[1] != b.block_output_digests[1]

    checkpoint = resolve_checkpoint(str(tiny_model))
    referee = load_span(checkpoint, *SPAN)
    with deterministic_profile():
        verdict, parties = loop.run(
            run_remote_dispute(
                p2p, honest.peer_id, cheater.peer_id, referee, a, b, "disputed", mask, None, TIMEOUT
            )
        )
        elapsed = time.perf_counter() - started
        assert verdict.losers == ("b",) and verdict.reasons == {"b": "wrong_output"}, parties["b"].failure
        assert (verdict.first_block + verdict.block, verdict.op) == (PERTURBED_BLOCK, PERTURBED_OP)
        assert verdict.evidence.claimed_outputs["a"] == verdict.evidence.recomputed_output
        assert verdict.rounds <= MAX_ROUNDS

        # anyone can re-check it with the one disputed block's weights and the operator's inputs
        block = load_span(checkpoint, PERTURBED_BLOCK, PERTURBED_BLOCK + 1)
        refs = tuple(verdict.evidence.input_refs.values())
        fetched = loop.run(parties["a"].respond(Question(verdict.rounds + 1, refs, tensors=True)))
        inputs = {name: fetched.tensors[ref] for name, ref in verdict.evidence.input_refs.items()}
        assert recheck_verdict(verdict, block, inputs, attention_mask=mask)
        framed = dataclasses.replace(verdict, losers=("a",), reasons={"a": "wrong_output"})
        assert not recheck_verdict(
            framed, block, inputs, attention_mask=mask
        )  # blaming the honest node fails
    wire = sum(party.wire_bytes for party in parties.values())
    print(
        f"\nremote dispute: {verdict.rounds} rounds, {verdict.bytes_moved} bytes by the game's count, "
        f"{wire} bytes of protobuf on the wire, {elapsed:.2f} s (commits included)"
    )


def test_bad_requests_get_error_replies_and_the_node_keeps_serving(nodes, client):
    _, processes = nodes
    loop, p2p = client
    node = processes["honest"]
    stub = VerificationProtocol.stub(p2p, node.peer_id)

    def ask(request_id: str, refs=(SPAN_INPUT,), tensors: bool = False) -> swarm_pb2.DisputeAnswerResponse:
        request = swarm_pb2.DisputeQuestionRequest(request_id=request_id, round=1, refs=refs, tensors=tensors)
        return loop.run(stub.rpc_dispute_answer(request, timeout=TIMEOUT))

    reply = ask("never-committed")
    assert reply.error.code == swarm_pb2.Error.UNKNOWN_SESSION and "never-committed" in reply.error.message
    assert ask("").error.code == swarm_pb2.Error.BAD_REQUEST
    commit(client, node, "kept")
    assert ask("kept", refs=(10_000,)).error.code == swarm_pb2.Error.BAD_REQUEST
    assert ask("kept", refs=(0, 0)).error.code == swarm_pb2.Error.BAD_REQUEST
    assert not ask("kept", refs=(SPAN_INPUT, 0)).HasField("error")
    # another peer that learns the id can't read the trace (traces are kept per caller)
    other_dht, _ = create_dht(nodes[0].initial_peers, client_mode=True)
    try:
        other = loop.run(other_dht.replicate_p2p())
        question = swarm_pb2.DisputeQuestionRequest(request_id="kept", round=1, refs=(SPAN_INPUT,))
        stolen = loop.run(
            VerificationProtocol.stub(other, node.peer_id).rpc_dispute_answer(question, timeout=TIMEOUT)
        )
        assert stolen.error.code == swarm_pb2.Error.UNKNOWN_SESSION
        loop.run(other.shutdown())
    finally:
        other_dht.shutdown()
    # a party that refuses forfeits rather than raising
    assert (
        loop.run(RemoteParty(p2p, node.peer_id, "never-committed", TIMEOUT).respond(Question(1, (0,))))
        is None
    )

    hidden, mask = padded_request(HIDDEN)
    big = torch.zeros(65, 1, HIDDEN)  # over the node's batch limit
    for args, code in [
        ((0, 2, hidden, mask), swarm_pb2.Error.UNKNOWN_BLOCKS),
        ((*SPAN, big, None), swarm_pb2.Error.TOO_LARGE),
        ((*SPAN, hidden, mask[:, :3]), swarm_pb2.Error.BAD_REQUEST),
    ]:
        with pytest.raises(Exception) as raised:
            loop.run(remote_commit(p2p, node.peer_id, "bad", *args, None, TIMEOUT))
        assert getattr(raised.value, "code", None) == code, raised.value
    forward = loop.run(remote_forward(p2p, node.peer_id, *SPAN, hidden, mask, None, TIMEOUT))
    assert forward.shape == hidden.shape and torch.isfinite(forward).all()


class _Party:
    def __init__(self, name: str):
        self.name = name


def test_trace_store_is_bounded_and_expires():
    now = [0.0]
    store = TraceStore(max_traces=3, max_bytes=100, ttl=10.0, clock=lambda: now[0])
    for index in range(4):
        store.put(f"r{index}", _Party(f"p{index}"), 10)
    assert len(store) == 3 and store.get("r3").name == "p3"
    with pytest.raises(Exception, match="r0"):
        store.get("r0")  # the oldest went first
    store.put("big", _Party("big"), 90)  # evicts the oldest until it fits
    assert len(store) == 2 and store.nbytes == 100 and store.get("r3").name == "p3"
    with pytest.raises(Exception, match="bytes"):
        store.put("huge", _Party("huge"), 101)
    now[0] = 11.0
    assert len(store) == 0
