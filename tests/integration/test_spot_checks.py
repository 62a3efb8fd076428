"""Client spot checks between real nodes: generation with verify_rate=1.0 catches a node that lies by one ulp
in one operator, convicts it at that block and operator, re-routes around it and still returns local greedy
text; an honest-only swarm sees no dispute."""

from __future__ import annotations

import json
import time

import pytest
import torch
from verification_helpers import start_nodes

from swarm.client import DistributedModelForCausalLM
from swarm.client.config import ClientConfig
from swarm.local import LocalSwarm, run_cli

PERTURBED_BLOCK = 4  # absolute; the back half [3, 6) has two honest nodes and a cheater
PERTURBED_OP = "down_proj"
MAX_DISPUTE_BYTES = 64 * 1024  # 3 blocks of the tiny model: about 30 kB (see the note's figures)


@pytest.fixture(scope="module")
def nodes(tiny_model, tmp_path_factory):
    """Blocks [0, 3) on one honest node; [3, 6) on two honest nodes and on a cheater that announces far more
    throughput, so that routes prefer it."""
    swarm = LocalSwarm(workdir=tmp_path_factory.mktemp("spot-check-swarm"))
    try:
        swarm.start_bootstrap()
        fault = f"perturb:block={PERTURBED_BLOCK},op={PERTURBED_OP}"
        specs = {
            "front": ("0:3", "--throughput", "1"),
            "honest": ("3:6", "--throughput", "1"),
            "honest2": ("3:6", "--throughput", "1"),
            "cheater": ("3:6", "--throughput", "1000", "--fault", fault),
        }
        processes = start_nodes(swarm, tiny_model, specs)
        yield swarm, {name: process.peer_id for name, process in processes.items()}
    finally:
        swarm.close()


def prompt(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(seed))


def usable_once_avoiding(reader, convicted: set[str], timeout: float = 20.0) -> set[str]:
    """The nodes `reader` would route to, read until none of `convicted` is among them or `timeout` s pass
    (a DHT read under load can miss a fresh verdict: read again)."""
    deadline = time.monotonic() + timeout
    while True:
        usable = {s.peer_id for s in reader.swarm.usable_servers(refresh=True)}
        if not usable & convicted or time.monotonic() > deadline:
            return usable
        time.sleep(1.0)


def local_greedy(local_model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return local_model.generate(input_ids, do_sample=False, max_new_tokens=max_new_tokens)


def test_a_one_ulp_liar_is_convicted_at_its_operator_and_the_text_stays_local(nodes, tiny_model, local_model):
    swarm, peers = nodes
    input_ids = prompt()
    expected = local_greedy(local_model, input_ids, max_new_tokens=6)
    with DistributedModelForCausalLM.from_pretrained(
        tiny_model, swarm.initial_peers, verify_rate=1.0
    ) as model:
        with model.inference_session(max_length=32) as session:
            output = model.generate(input_ids, max_new_tokens=6, do_sample=False, session=session)
        convicted = set(model.swarm.convicted)
        author = model.swarm.dht.peer_id.to_base58()  # the client that refereed publishes the verdict
        checks = session.spot_checks
        route_after = {span.peer_id for span in session.route}
    assert torch.equal(output, expected)
    assert convicted == {peers["cheater"]}  # the honest nodes never are
    disputes = [check for check in checks if check.outcome == "disputed"]
    assert len(disputes) == 1, [(c.outcome, c.peer_id) for c in checks]
    dispute = disputes[0]
    # routes preferred the cheater: its lie was caught on the first step, and the step ran again elsewhere
    assert dispute.peer_id == peers["cheater"] and dispute.second in (peers["honest"], peers["honest2"])
    assert dispute.convicted == (peers["cheater"],)
    verdict = dispute.verdict
    assert (verdict.first_block + verdict.block, verdict.op) == (PERTURBED_BLOCK, PERTURBED_OP)
    assert verdict.reasons == {"a": "wrong_output"}
    assert verdict.bytes_moved < MAX_DISPUTE_BYTES
    assert session.num_recoveries == 1 and peers["cheater"] not in route_after
    # the check ran behind the next step (generate() defers checks) and its conviction rewound the session
    assert session.num_rewinds == 1
    # after the conviction, checks of [3, 6) compare the two honest nodes, which agree bit for bit
    later = [c for c in checks if c.start == 3 and c is not dispute]
    assert later and all(c.outcome == "agreed" for c in later)
    assert all(c.outcome == "no_second" for c in checks if c.start == 0)
    assert dispute.record is not None and dispute.record.losers == [peers["cheater"]]

    # another client, checking nothing itself, finds the verdict in the DHT, re-checks it, avoids the cheater
    with DistributedModelForCausalLM.from_pretrained(tiny_model, swarm.initial_peers) as reader:
        usable = usable_once_avoiding(reader, {peers["cheater"]})
        against = reader.swarm.verdicts.verdicts_against(peers["cheater"])
        assert peers["cheater"] not in usable and peers["honest"] in usable
        assert [(v["block"], v["op"], v["reason"]) for v in against] == [
            (PERTURBED_BLOCK, PERTURBED_OP, "wrong_output")
        ]
        assert not reader.swarm.verdicts.false_authors()
        assert torch.equal(reader.generate(input_ids, max_new_tokens=6, do_sample=False), expected)

    # `swarm health` re-checks it with the weights it is given and shows it against the cheater only
    health = run_cli(
        ["health", "--initial-peers", *swarm.initial_peers]
        + ["--model", "tiny-llama", "--checkpoint", str(tiny_model), "--json"],
        timeout=120,
    )
    assert health.stdout, health.stderr[-3000:]
    nodes_by_id = {node["peer_id"]: node for node in json.loads(health.stdout)["nodes"]}
    assert nodes_by_id[peers["cheater"]]["banned"] is True
    [verdict] = nodes_by_id[peers["cheater"]]["verdicts"]
    assert (verdict["against"], verdict["block"], verdict["op"]) == (peers["cheater"], 4, "down_proj")
    assert verdict["by"] == author
    assert not any(nodes_by_id[peers[name]]["banned"] for name in ("front", "honest", "honest2"))
    assert all(not nodes_by_id[peers[name]]["verdicts"] for name in ("front", "honest", "honest2"))


def test_a_conviction_behind_generation_rewinds_it_to_the_checked_step(nodes, tiny_model, local_model):
    """Checks start at the third step (position 9): the cheater's check runs while generation goes on, and
    its conviction takes the session back to position 9; the tokens after it are generated again through
    an honest node and the text equals local greedy."""
    swarm, peers = nodes
    input_ids = prompt(seed=3)
    expected = local_greedy(local_model, input_ids, max_new_tokens=8)
    with DistributedModelForCausalLM.from_pretrained(
        tiny_model,
        swarm.initial_peers,
        verify_rate=1.0,
        honour_verdicts=False,  # else the first test's verdict
    ) as model:
        draws = iter(range(10**6))
        model.swarm.spot_checker.should_check = lambda: next(draws) >= 4  # two spans per step: from step 3
        positions = []
        with model.inference_session(max_length=32) as session:
            session.on_step = positions.append
            output = model.generate(input_ids, max_new_tokens=8, do_sample=False, session=session)
        convicted = set(model.swarm.convicted)
    assert torch.equal(output, expected)
    assert convicted == {peers["cheater"]}
    assert session.num_rewinds == 1 and session.num_recoveries == 1
    assert positions[:3] == [8, 9, 10]
    back = [i for i in range(1, len(positions)) if positions[i] <= positions[i - 1]]
    assert len(back) == 1 and positions[back[0]] == 10, positions  # the step at 9 ran again
    assert positions[-1] == 8 + 8 - 1  # the last new token is returned, not fed
    [dispute] = [c for c in session.spot_checks if c.outcome == "disputed"]
    assert dispute.peer_id == peers["cheater"]


def test_honest_nodes_agree_and_nobody_is_convicted(nodes, tiny_model, local_model):
    swarm, peers = nodes
    input_ids = prompt(seed=1)
    expected = local_greedy(local_model, input_ids, max_new_tokens=4)
    with DistributedModelForCausalLM.from_pretrained(
        tiny_model, swarm.initial_peers, verify_rate=1.0, blocked_servers=[peers["cheater"]]
    ) as model:
        with model.inference_session(max_length=32) as session:
            output = model.generate(input_ids, max_new_tokens=4, do_sample=False, session=session)
        assert not model.swarm.convicted
    assert torch.equal(output, expected)
    assert session.num_recoveries == 0
    outcomes = {(c.start, c.outcome) for c in session.spot_checks}
    assert outcomes == {(0, "no_second"), (3, "agreed")}  # one node serves [0, 3): nobody to compare with


def test_verify_rate_outside_zero_one_is_refused_before_joining():
    with pytest.raises(ValueError, match="verify_rate"):
        ClientConfig(verify_rate=1.5)


def test_forward_and_backward_use_the_winner_of_a_dispute(nodes, tiny_model):
    """Prompt tuning through the swarm with verify_rate=1.0: the forward through the back half is checked
    against a second node, the cheater is one of the two (as the routed node or as the second: routes prefer
    it, but on a loaded machine the ping can outweigh its throughput; the checked client sees only one honest
    node there), the winner's output is used, and backward avoids the convicted node, so logits and prompt
    gradients equal an honest-only client's."""
    swarm, peers = nodes
    input_ids = prompt(seed=2).expand(2, -1)
    results = {}
    for name, options in {
        # honour_verdicts: else the first test's verdict excludes the cheater; honest2 blocked: else a call
        # routed to an honest node may pick the other honest one as its second, and no dispute happens
        "checked": dict(verify_rate=1.0, honour_verdicts=False, blocked_servers=[peers["honest2"]]),
        "honest_only": dict(blocked_servers=[peers["cheater"]]),
    }.items():
        with DistributedModelForCausalLM.from_pretrained(
            tiny_model, swarm.initial_peers, tuning_mode="ptune", pre_seq_len=2, **options
        ) as model:
            with torch.no_grad():
                model.prompt_embeddings.weight.copy_(torch.linspace(-1, 1, 2 * 64).view(2, 64))
            logits = model(input_ids).logits
            logits.square().mean().backward()
            results[name] = (logits.detach(), model.prompt_embeddings.weight.grad.clone())
            if name == "checked":
                convicted, checks = set(model.swarm.convicted), model.blocks.spot_checks
    assert convicted == {peers["cheater"]}
    disputed = [c for c in checks if c.outcome == "disputed"]
    assert len(disputed) == 1 and disputed[0].convicted == (peers["cheater"],)
    parties = {disputed[0].peer_id, disputed[0].second}
    assert peers["cheater"] in parties and parties & {peers["honest"], peers["honest2"]}
    torch.testing.assert_close(results["checked"][0], results["honest_only"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(results["checked"][1], results["honest_only"][1], rtol=0, atol=1e-6)


def test_two_cheaters_both_lose_to_an_honest_third(tiny_model, local_model, local_swarm):
    """Two nodes lying in different places: whichever wins their dispute is only right about the disputed
    operator, so the re-run is checked again, against the honest node, and loses too."""
    local_swarm.start_bootstrap()
    specs = {
        "front": ("0:3", "--throughput", "1"),
        "cheater": ("3:6", "--throughput", "1000", "--fault", f"perturb:block={PERTURBED_BLOCK}"),
        "cheater2": ("3:6", "--throughput", "100", "--fault", "perturb:block=5,op=q_proj"),
        "honest": ("3:6", "--throughput", "1"),
    }
    processes = start_nodes(local_swarm, tiny_model, specs)
    peers = {name: process.peer_id for name, process in processes.items()}
    input_ids = prompt(seed=3)
    expected = local_greedy(local_model, input_ids, max_new_tokens=4)
    with DistributedModelForCausalLM.from_pretrained(
        tiny_model, local_swarm.initial_peers, verify_rate=1.0
    ) as model:
        with model.inference_session(max_length=32) as session:
            output = model.generate(input_ids, max_new_tokens=4, do_sample=False, session=session)
            route = {span.peer_id for span in session.route}
        convicted = set(model.swarm.convicted)
    assert torch.equal(output, expected)
    assert convicted == {peers["cheater"], peers["cheater2"]}
    assert route == {peers["front"], peers["honest"]}
    disputes = [c for c in session.spot_checks if c.outcome == "disputed"]
    assert len(disputes) == 2 and all(len(c.convicted) == 1 for c in disputes)

    # both verdicts stay in the DHT (one client's second verdict does not replace its first), and another
    # client re-checks and honours both
    with DistributedModelForCausalLM.from_pretrained(tiny_model, local_swarm.initial_peers) as reader:
        usable = usable_once_avoiding(reader, convicted)
        assert usable == {peers["front"], peers["honest"]}
        assert reader.swarm.verdicts.convicted() == convicted


def test_a_liar_and_a_silent_party_lose_their_dispute(tiny_model, local_model, local_swarm):
    """A cheater that also lies about its trace in the dispute, and one that goes silent: both lose (bad
    proofs, forfeit), and the text comes from the honest node."""
    local_swarm.start_bootstrap()
    # the two cheaters tell different lies: with the same one they would agree bit for bit whenever a check
    # picked one as the other's second, and no check can catch cheaters who agree
    lie, other_lie = f"perturb:block={PERTURBED_BLOCK}", f"perturb:block={PERTURBED_BLOCK},ulp=2"
    specs = {
        "front": ("0:3", "--throughput", "1"),
        "liar": ("3:6", "--throughput", "1000", "--fault", lie, "--fault", "lie_in_dispute"),
        "silent": ("3:6", "--throughput", "100", "--fault", other_lie, "--fault", "silent_in_dispute"),
        "honest": ("3:6", "--throughput", "1"),
    }
    processes = start_nodes(local_swarm, tiny_model, specs)
    peers = {name: process.peer_id for name, process in processes.items()}
    input_ids = prompt(seed=4)
    expected = local_greedy(local_model, input_ids, max_new_tokens=3)
    with DistributedModelForCausalLM.from_pretrained(
        tiny_model, local_swarm.initial_peers, verify_rate=1.0, request_timeout=5.0
    ) as model:
        with model.inference_session(max_length=32) as session:
            output = model.generate(input_ids, max_new_tokens=3, do_sample=False, session=session)
            route = {span.peer_id for span in session.route}
        convicted = set(model.swarm.convicted)
    assert torch.equal(output, expected)
    assert convicted == {peers["liar"], peers["silent"]}
    assert route == {peers["front"], peers["honest"]}
    reasons = {}
    for check in session.spot_checks:
        if check.outcome == "disputed":
            names = {"a": check.peer_id, "b": check.second}
            reasons.update({names[party]: why for party, why in check.verdict.reasons.items()})
    assert reasons[peers["liar"]] in ("bad_proof", "contradiction")
    assert reasons[peers["silent"]] == "silent"
    assert peers["honest"] not in reasons


def test_nodes_with_different_profiles_are_compared_within_a_tolerance_and_never_convicted(
    tiny_model, local_model, local_swarm
):
    local_swarm.start_bootstrap()
    specs = {
        "whole": ("0:6", "--throughput", "1000"),
        "loose": ("0:6", "--throughput", "1", "--no-deterministic"),
    }
    start_nodes(local_swarm, tiny_model, specs)
    input_ids = prompt(seed=5)
    expected = local_greedy(local_model, input_ids, max_new_tokens=3)
    with DistributedModelForCausalLM.from_pretrained(
        tiny_model, local_swarm.initial_peers, verify_rate=1.0
    ) as model:
        with model.inference_session(max_length=32) as session:
            output = model.generate(input_ids, max_new_tokens=3, do_sample=False, session=session)
        assert not model.swarm.convicted
    assert torch.equal(output, expected)
    outcomes = [c.outcome for c in session.spot_checks]
    assert outcomes and set(outcomes) == {"close"}, outcomes
    assert all(c.max_difference < 1e-3 for c in session.spot_checks)
