"""A node that frames an honest peer (`--fault frame`) between real processes: it obtains the victim's real
signed commitment, publishes a verdict record naming the victim as the loser, and every client that re-checks
the record (at the cost of one operator, with its own weights) bans the framer instead; the victim keeps
serving and the text stays equal to local greedy decoding."""

from __future__ import annotations

import json
import time

import pytest
import torch
from verification_helpers import start_nodes

from swarm.client import DistributedModelForCausalLM
from swarm.dht.factory import create_dht
from swarm.local import LocalSwarm, run_cli
from swarm.models.checkpoint import resolve_checkpoint
from swarm.verification.framing import FRAMED_OP
from swarm.verification.verdicts import read_claim, read_verdicts

FRAMED_BLOCK = 4  # absolute; the framer [2, 5) and the victims [3, 6) share [3, 5)
VERDICT_WAIT_S = 60.0  # the framer retries every 2 s until a victim is online, then publishes in ~1 s
DHT_TIMEOUT_S = 10.0
HEALTH_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def nodes(tiny_model, tmp_path_factory):
    """Blocks [0, 3) on one honest node, [3, 6) on two honest ones, and a framer on [2, 5) that announces
    far more throughput (routes would prefer it) and frames a peer serving block 4."""
    swarm = LocalSwarm(workdir=tmp_path_factory.mktemp("framing-swarm"))
    try:
        swarm.start_bootstrap()
        specs = {
            "front": ("0:3", "--throughput", "1"),
            "honest": ("3:6", "--throughput", "1"),
            "honest2": ("3:6", "--throughput", "1"),
            "framer": ("2:5", "--throughput", "1000", "--fault", f"frame:block={FRAMED_BLOCK}"),
        }
        processes = start_nodes(swarm, tiny_model, specs)
        yield swarm, {name: process.peer_id for name, process in processes.items()}
    finally:
        swarm.close()


@pytest.fixture(scope="module")
def framing_record(nodes, tiny_model):
    """The framer's verdict record, once it is in the DHT (read by a peer of its own, in client mode)."""
    swarm, peers = nodes
    model_name = resolve_checkpoint(str(tiny_model)).name
    reader, _ = create_dht(swarm.initial_peers, client_mode=True)
    try:
        deadline = time.monotonic() + VERDICT_WAIT_S
        while not (found := read_verdicts(reader, model_name, timeout=DHT_TIMEOUT_S)):
            if time.monotonic() > deadline:
                log = next(p for p in swarm.processes if p.name == "framer").log()[-3000:]
                pytest.fail(f"no verdict in the DHT after {VERDICT_WAIT_S} s; the framer's log:\n{log}")
            time.sleep(0.5)
    finally:
        reader.shutdown()
    assert [author for author, _ in found] == [peers["framer"]]  # nobody else published anything
    return found[0][1]


def prompt(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(seed))


def local_greedy(local_model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return local_model.generate(input_ids, do_sample=False, max_new_tokens=max_new_tokens)


def test_a_framer_is_banned_by_clients_and_health_and_its_victim_is_not(
    nodes, framing_record, tiny_model, local_model
):
    swarm, peers = nodes
    framer = peers["framer"]
    # the record frames one of the peers that serve block 4, with that peer's real signed commitment
    (victim,) = framing_record.losers
    assert victim in (peers["honest"], peers["honest2"])
    assert set(framing_record.parties) == {victim, framer}
    assert dict(framing_record.reasons) == {victim: "wrong_output"}
    assert (framing_record.first_block + framing_record.block, framing_record.op) == (FRAMED_BLOCK, FRAMED_OP)
    # its signatures, roots, proofs and inputs are genuine (read_claim raises FalseVerdict on any bad one):
    # only recomputing the operator exposes it
    read_claim(framing_record)

    input_ids = prompt()
    expected = local_greedy(local_model, input_ids, max_new_tokens=6)
    with DistributedModelForCausalLM.from_pretrained(tiny_model, swarm.initial_peers) as model:
        usable = {server.peer_id for server in model.swarm.usable_servers(refresh=True)}
        book = model.swarm.verdicts
        assert book.false_authors() == {framer}
        assert book.convicted() == set() and victim not in book.banned()
        assert book.verdicts_against(victim) == []
        [against] = book.verdicts_against(framer)
        assert (against["reason"], against["by"], against["block"]) == ("false_verdict", framer, FRAMED_BLOCK)
        assert framer not in usable
        assert {peers["front"], peers["honest"], peers["honest2"]} <= usable
        with model.inference_session(max_length=32) as session:
            output = model.generate(input_ids, max_new_tokens=6, do_sample=False, session=session)
            route = {span.peer_id for span in session.route}
    assert torch.equal(output, expected)
    assert framer not in route

    # `swarm health` re-checks the record with the weights it is given: the framer banned, the victim clean
    health = run_cli(
        ["health", "--initial-peers", *swarm.initial_peers]
        + ["--model", "tiny-llama", "--checkpoint", str(tiny_model), "--json"],
        timeout=HEALTH_TIMEOUT_S,
    )
    assert health.stdout, health.stderr[-3000:]
    nodes_by_id = {node["peer_id"]: node for node in json.loads(health.stdout)["nodes"]}
    assert nodes_by_id[framer]["banned"] is True
    [verdict] = nodes_by_id[framer]["verdicts"]
    assert (verdict["reason"], verdict["by"], verdict["block"]) == ("false_verdict", framer, FRAMED_BLOCK)
    assert nodes_by_id[victim]["banned"] is False and nodes_by_id[victim]["verdicts"] == []
    for name in ("front", "honest", "honest2"):
        assert not nodes_by_id[peers[name]]["banned"] and not nodes_by_id[peers[name]]["verdicts"]
