"""Who may settle a "bad_gradient" accusation for peers that can't recompute it, over a real DHT.

An outsider (a stage peer judging a trainer, or `swarm run status`) follows the verdicts of the accused's
group. A member that missed the accused round still holds the weights to recompute it, so its verdict
counts once it is announced live in that group; a peer that is neither in the round nor live in the group
is ignored.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from hivemind.utils.timed_storage import get_dht_time

from swarm.averaging.accusations import BAD_GRADIENT, make_accusation
from swarm.averaging.btard import ACCUSATION_TTL, file_accusation, store_statement
from swarm.averaging.commitments import commit_payload
from swarm.averaging.statements import digest, sign_statement, signing_key_of
from swarm.dht.announcer import store_records
from swarm.dht.factory import create_dht
from swarm.dht.keys import trainers_key
from swarm.proto import swarm_pb2
from swarm.training.bans import RunBans, accusations_key
from swarm.training.run import TRAINERS_GROUP, group_prefix, load_run, make_run, write_run
from swarm.training.validation import VERDICT_TAG, CannotJudge, verdict_statement

STEP = 0


@pytest.fixture
def peers():
    """Four DHT peers: accuser, accused, a trainer that missed the round, and an outsider that judges."""
    first, validator = create_dht(host="127.0.0.1")
    made = [(first, validator)]
    try:
        initial = [str(a) for a in first.get_visible_maddrs()]
        made += [create_dht(initial, host="127.0.0.1") for _ in range(3)]
        yield [(dht, v) for dht, v in made]
    finally:
        for dht, _ in made:
            dht.shutdown()


def _announce_trainer(dht, validator, run, state=swarm_pb2.ServerInfo.ONLINE) -> None:
    peer_id = dht.peer_id.to_base58()
    info = swarm_pb2.TrainerInfo(state=state, peer_id=peer_id, run_id=run.config.run_id, run_hash=run.sha256)
    key = trainers_key(run.config.run_id)
    assert store_records(dht, validator.local_public_key, peer_id, [(key, info)], get_dht_time() + 60)


def _judge(bans: RunBans) -> set[str]:
    asyncio.run(bans.refresh())
    return bans.banned()


def test_a_live_group_member_outside_the_round_settles_it(peers, tiny_model, tmp_path):
    run_path = tmp_path / "run.toml"
    write_run(make_run("gradverdicts", str(tiny_model), 1, target_batch_size=8, microbatch_size=4), run_path)
    run = load_run(run_path)
    (accuser_dht, accuser), (accused_dht, accused), (third_dht, third_validator), (outsider_dht, _) = peers
    accuser, accused, third = (signing_key_of(v) for v in (accuser, accused, third_validator))
    accused_id, third_id = accused_dht.peer_id.to_base58(), third_dht.peer_id.to_base58()
    prefix = group_prefix(run, TRAINERS_GROUP)
    # the round had two members: the accuser and the accused
    commits = [
        sign_statement(k, commit_payload(prefix, STEP, [digest(b"chunk")], digest(b"secret")))
        for k in (accused, accuser)
    ]
    blob = make_accusation(accuser, BAD_GRADIENT, accused_id, prefix, STEP, b"group", 0, commits)
    assert file_accusation(accuser_dht, accusations_key(run), accuser, blob)
    # the third trainer recomputed it and found it wrong
    tag = f"{VERDICT_TAG}-{digest(blob).hex()[:16]}"
    verdict = verdict_statement(third, digest(blob).hex(), accused_id)
    assert store_statement(third_dht, accusations_key(run), tag, third, verdict, ACCUSATION_TTL)

    async def make_bans():
        return RunBans(outsider_dht, await outsider_dht.replicate_p2p(), run)

    bans = asyncio.run(make_bans())
    # not in the round, not announced in the group: its verdict counts for nothing yet
    assert _judge(bans) == set()
    _announce_trainer(third_dht, third_validator, run, swarm_pb2.ServerInfo.OFFLINE)
    assert _judge(bans) == set()  # a member that left the group is no voter either
    _announce_trainer(third_dht, third_validator, run)
    deadline = time.monotonic() + 30
    while (banned := _judge(bans)) != {accused_id} and time.monotonic() < deadline:
        time.sleep(0.5)
    assert banned == {accused_id}
    assert third_id not in banned
    [ban] = bans.as_json()
    assert "1 of the group's other members found the gradient wrong" in ban["reason"]


def test_when_no_member_of_the_round_can_judge_nobody_waits_forever(peers, tiny_model, tmp_path):
    """The accusation's only judge (the round's third member) lost the weights it needs: it says so in a
    signed verdict and settles without a ban, and an outsider that waited for that member's verdict stops
    waiting too, instead of logging "not judged yet" for as long as it runs."""
    run_path = tmp_path / "run.toml"
    write_run(make_run("cantjudge", str(tiny_model), 1, target_batch_size=8, microbatch_size=4), run_path)
    run = load_run(run_path)
    (accuser_dht, accuser), (accused_dht, accused), (third_dht, third), (outsider_dht, _) = peers
    accuser, accused, third = (signing_key_of(v) for v in (accuser, accused, third))
    accused_id, third_id = accused_dht.peer_id.to_base58(), third_dht.peer_id.to_base58()
    prefix = group_prefix(run, TRAINERS_GROUP)
    commits = [
        sign_statement(k, commit_payload(prefix, STEP, [digest(b"chunk")], digest(b"secret")))
        for k in (accused, accuser, third)
    ]
    blob = make_accusation(accuser, BAD_GRADIENT, accused_id, prefix, STEP, b"group", 0, commits)
    assert file_accusation(accuser_dht, accusations_key(run), accuser, blob)
    asked = []

    async def cannot_judge(accusation: dict):
        asked.append(accusation["accusation"])
        raise CannotJudge("this peer no longer holds the weights of step(s) [0]")

    async def make_bans(dht, own_id="", key=None):
        return RunBans(dht, await dht.replicate_p2p(), run, own_id, key)

    outsider = asyncio.run(make_bans(outsider_dht))
    assert _judge(outsider) == set() and outsider.suspected() == {accused_id}  # waits for the third's verdict
    judge = asyncio.run(make_bans(third_dht, third_id, third))
    judge.gradient_judge = cannot_judge
    assert _judge(judge) == set() and judge.suspected() == set()  # settled, without a ban
    assert _judge(judge) == set() and asked == [digest(blob).hex()]  # once
    deadline = time.monotonic() + 30
    while outsider.suspected() and time.monotonic() < deadline:
        time.sleep(0.5)
        _judge(outsider)
    assert outsider.suspected() == set() and outsider.banned() == set()
