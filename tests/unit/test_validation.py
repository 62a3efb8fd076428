"""Gradient validation's pieces without a network: receipts, the pairing, the log, recomputation, verdicts."""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from swarm.averaging.accusations import BAD_GRADIENT, GOOD_FAITH, judge, make_accusation
from swarm.averaging.commitments import commit_payload
from swarm.averaging.statements import InvalidStatement, digest, sign_statement
from swarm.dht.identity import peer_id_of
from swarm.models.checkpoint import resolve_checkpoint
from swarm.models.head import load_client_head
from swarm.models.span import LlamaSpan
from swarm.models.tiny import tiny_llama_config
from swarm.node.backend import SpanInputs
from swarm.node.limits import NodeLimits
from swarm.training.export import EMBED, LM_HEAD, NORM
from swarm.training.head_gradients import TrainerRecomputer, embedding_gradients, loss_gradients
from swarm.training.run import OptimizerSettings
from swarm.training.stage import TrainableSpanBackend
from swarm.training.trainable import TrainableParameters
from swarm.training.validation import (
    CANNOT_JUDGE,
    VALIDATION_RTOL,
    ContributionLog,
    GradientValidator,
    GroupValidation,
    Microbatch,
    check_receipt,
    choose_pairs,
    majority_verdict,
    relative_error,
    round_members,
    sign_receipt,
    sign_reply,
    verdict_statement,
)

RUN, PREFIX, STEP = "ab" * 32, "run_stage0", 7


@pytest.fixture(scope="module")
def keys() -> list[RSAPrivateKey]:
    return [RSAPrivateKey() for _ in range(4)]


def test_receipt_covers_exactly_what_was_sent(keys):
    inputs, grads = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    receipt = sign_receipt(keys[0], RUN, 1, inputs, grads)
    assert check_receipt(receipt, RUN, 1, inputs, grads, signer=peer_id_of(keys[0])) == peer_id_of(keys[0])
    changed = grads.clone()
    changed[0, 0, 0] = torch.nextafter(changed[0, 0, 0], torch.tensor(1e9))  # one ulp
    for args in [(RUN, 1, inputs, changed), (RUN, 2, inputs, grads), ("cd" * 32, 1, inputs, grads)]:
        with pytest.raises(InvalidStatement):
            check_receipt(receipt, *args)
    with pytest.raises(InvalidStatement, match="caller"):  # relayed by another peer than its signer
        check_receipt(receipt, RUN, 1, inputs, grads, signer=peer_id_of(keys[1]))
    with pytest.raises(InvalidStatement):  # the same tensors in another dtype are other bytes
        check_receipt(receipt, RUN, 1, inputs.double(), grads)
    with pytest.raises(InvalidStatement):
        check_receipt(b"", RUN, 1, inputs, grads)


def test_pairs_come_from_the_seed_and_nobody_checks_itself():
    members = [f"peer{i}" for i in range(5)]
    seed = os.urandom(32)
    pairs = choose_pairs(seed, members, 3)
    assert pairs == choose_pairs(seed, list(reversed(members)), 3)  # every member derives the same pairs
    assert len(pairs) == 3 and all(v != t for v, t in pairs)
    assert len({v for v, _ in pairs}) == 3 and len({t for _, t in pairs}) == 3
    everyone = choose_pairs(seed, members, 99)  # at most one check per member: a cycle through all
    assert sorted(v for v, _ in everyone) == sorted(t for _, t in everyone) == members
    assert choose_pairs(seed, members[:1], 3) == [] and choose_pairs(seed, members, 0) == []
    # over seeds, every member gets checked, by every other member
    seen = {(v, t) for _ in range(300) for v, t in choose_pairs(os.urandom(32), members, 1)}
    assert seen == {(v, t) for v in members for t in members if v != t}


def test_relative_error():
    a = [torch.ones(3), torch.zeros(2)]
    assert relative_error(a, a) == 0.0
    assert relative_error([torch.zeros(3)], [torch.zeros(3)]) == 0.0
    assert relative_error([-1000 * t for t in a], a) > 1.0
    assert relative_error([t * (1 + 1e-7) for t in a], a) < VALIDATION_RTOL


def test_log_keeps_the_last_rounds():
    log = ContributionLog(keep=2)
    params = [torch.zeros(3)]
    for step in range(4):
        log.snapshot(step, [p + step for p in params])
        tensors = {"inputs": torch.full((1, 1, 1), float(step)), "grad_outputs": torch.zeros(1, 1, 1)}
        log.add(Microbatch("stage", tensors, [b"r"], step))
        assert log.get(step) is None  # not closed, nothing sent yet
        log.close(step)
        assert log.get(step) is None  # closed, nothing sent yet
        log.record_sent(step, [torch.full((3,), float(step))])
    assert log.get(0) is None and log.get(1) is None and log.weights(1) is None
    contribution = log.get(3)
    assert contribution.step == 3 and float(contribution.sent[0][0]) == 3.0
    assert [float(m.tensors["inputs"]) for m in contribution.microbatches] == [3.0]
    assert torch.equal(log.weights(2)[0], torch.full((3,), 2.0))
    log.add(Microbatch("stage", tensors, [b"r"], 4))
    log.restart(9, [torch.ones(3)])  # it loaded another peer's state at step 9
    assert log.get(3) is not None  # its own past contributions stay
    assert log.weights(3) is None and torch.equal(log.weights(9)[0], torch.ones(3))
    log.close(9)
    log.record_sent(9, [torch.zeros(3)])
    assert log.get(9).microbatches == []  # the microbatch whose gradient the load dropped is gone


def test_log_holds_steps_past_its_window_within_a_budget():
    """Rounds can outrun the checks under load: steps that an accusation needs stay past the window until
    released or expired, and recent rounds as far as the budget allows; a hold beyond the budget is
    refused, so a flood of accusations can't pin unbounded weights."""
    now = [0.0]
    log = ContributionLog(keep=2, max_held=2, clock=lambda: now[0])

    def round_at(step: int) -> None:
        log.snapshot(step, [torch.full((3,), float(step))])
        log.close(step)
        log.record_sent(step, [torch.full((3,), float(step))])

    round_at(0)
    assert log.hold("accused at 0", [0], seconds=60)
    assert log.hold("accused at 0", [0, 1], seconds=60)  # held already: unchanged
    for step in range(1, 6):
        round_at(step)
    assert log.weights(0) is not None and log.get(0) is not None  # held past the window (4, 5)
    assert log.weights(1) is None and log.get(1) is None and log.weights(3) is None
    assert not log.hold("flood", [2, 3], seconds=60)  # {0, 2, 3}: over the budget of 2, nothing held
    assert log.held() == {0}
    with pytest.raises(ValueError, match="positive"):
        log.hold("bad", [5], seconds=0)
    assert log.held() == {0}
    assert log.hold("accused at 5", [4, 5], seconds=10) is False  # {0, 4, 5}
    assert log.hold("accused at 5", [5], seconds=10)
    log.release("accused at 0")
    round_at(6)
    assert log.weights(0) is None and log.get(0) is None  # released: gone with the next round
    now[0] = 11.0  # the hold of step 5 expired
    round_at(7)
    assert log.held() == set() and log.weights(5) is None
    # recent rounds stay past the window, newest first while the budget allows, for validations to come
    for step in range(8, 12):
        round_at(step)
        log.hold_round(step, seconds=100)
    assert [s for s in range(12) if log.weights(s) is not None] == [8, 9, 10, 11]
    assert log.hold("accused at 8", [8], seconds=60)  # holds come first; recent rounds fill what is left
    round_at(12)
    assert [s for s in range(13) if log.weights(s) is not None] == [8, 10, 11, 12]
    round_at(13)
    assert [s for s in range(14) if log.weights(s) is not None] == [8, 11, 12, 13]
    now[0] = 200.0
    round_at(14)
    assert [s for s in range(15) if log.weights(s) is not None] == [13, 14]


def _backend() -> TrainableSpanBackend:
    torch.manual_seed(0)
    span = LlamaSpan(tiny_llama_config(num_blocks=2, hidden_size=32), 0, 2).float()
    return TrainableSpanBackend(span, NodeLimits(), "cpu", OptimizerSettings(lr=1e-2), run_hash=RUN, stage=0)


def _backward(backend: TrainableSpanBackend, key: RSAPrivateKey, batch: int) -> None:
    hidden, grads = torch.randn(batch, 4, 32), torch.randn(batch, 4, 32)
    receipt = sign_receipt(key, RUN, 0, hidden, grads)
    inputs = SpanInputs(hidden, None, None, slice(None), torch.float32, grad_outputs=grads, receipt=receipt)
    backend._backward_sync(inputs)


def test_recomputation_equals_what_the_peer_accumulated(keys):
    """A round whose microbatches ran on two steps' weights (a backward that arrives while the previous
    round averages runs on the old weights): a validator holding the same weights recomputes the sent
    gradient bit for bit, and leaves its own weights as they were."""
    peer, validator = _backend(), _backend()
    _backward(peer, keys[0], 2)
    grads, _ = peer.take_gradients()  # round 0
    peer.log.record_sent(0, grads)
    _backward(peer, keys[0], 1)  # during round 0's averaging: weights of step 0, counted in round 1
    for backend in (peer, validator):
        backend.apply(grads)  # both at step 1, with the same weights
    _backward(peer, keys[0], 3)
    sent, samples = peer.take_gradients()  # round 1
    peer.log.record_sent(1, sent)
    assert samples == 4
    contribution = peer.log.get(1)
    assert [m.weights_step for m in contribution.microbatches] == [0, 1]
    weights = {0: validator.log.weights(0), 1: validator.log.weights(1)}
    validator.apply([torch.randn_like(g) for g in grads])  # the validator moved on to step 2
    before = [p.detach().clone() for p in validator.trainable.params]
    expected = validator.recompute_mean_gradient(contribution.microbatches, weights)
    assert relative_error(contribution.sent, expected) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, validator.trainable.params, strict=True))
    assert relative_error([-1000 * g for g in sent], expected) > 1.0  # sign_flip
    assert relative_error([0 * g for g in sent], expected) == 1.0  # a lazy peer
    wrong_step = validator.recompute_mean_gradient(contribution.microbatches, {0: weights[1], 1: weights[1]})
    assert relative_error(sent, wrong_step) > 0  # the weights of each microbatch's own step matter


def _commit(key: RSAPrivateKey) -> bytes:
    return sign_statement(key, commit_payload(PREFIX, STEP, [digest(b"chunk")], digest(b"secret")))


def test_bad_gradient_accusations_are_judged_by_recomputation(keys):
    accuser, accused = keys[0], keys[1]
    commits = [_commit(k) for k in keys[1:]]
    blob = make_accusation(accuser, BAD_GRADIENT, peer_id_of(accused), PREFIX, STEP, b"g", 0, commits)

    async def guilty(payload):
        assert payload["accuser"] == peer_id_of(accuser) and payload["accusation"]
        return payload["accused"], "recomputed"

    async def innocent(payload):
        return None, "matches"

    verdict = asyncio.run(judge(blob, guilty))
    assert verdict.guilty == peer_id_of(accused)
    assert asyncio.run(judge(blob, innocent)).guilty == peer_id_of(accuser)  # a false accusation
    assert asyncio.run(judge(blob, None)) is None  # can't recompute: undecided
    # the accused's commitment must come first: otherwise the accusation is bogus and bans its author
    forged = make_accusation(accuser, BAD_GRADIENT, peer_id_of(accused), PREFIX, STEP, b"g", 0, commits[1:])
    assert asyncio.run(judge(forged, guilty)).guilty == peer_id_of(accuser)


def test_outsiders_follow_the_majority_of_the_rounds_other_members(keys):
    accuser, accused, third, fourth = (peer_id_of(k) for k in keys)
    commits = [_commit(k) for k in (keys[1], keys[0], keys[2], keys[3])]
    accusation = {"accuser": accuser, "accused": accused, "accusation": "ff" * 32, "prefix": PREFIX}
    accusation.update(step=STEP, evidence=commits)
    members = round_members(accusation)
    assert members == {accuser, accused, third, fourth}

    def votes(*pairs):
        return {peer_id_of(k): verdict_statement(k, "ff" * 32, guilty) for k, guilty in pairs}

    assert majority_verdict(accusation, {}, members) is None  # nobody spoke yet: undecided
    # the accuser's and the accused's own verdicts don't count
    assert majority_verdict(accusation, votes((keys[0], accused), (keys[1], accuser)), members) is None
    assert majority_verdict(accusation, votes((keys[2], accused)), members)[0] == accused
    assert majority_verdict(accusation, votes((keys[2], accuser)), members)[0] is None
    assert (
        majority_verdict(accusation, votes((keys[2], accused), (keys[3], accuser)), members)[0] == GOOD_FAITH
    )
    outsider = RSAPrivateKey()  # not in the round: ignored
    assert majority_verdict(accusation, votes((outsider, accused)), members) is None
    # a verdict about another accusation, relayed under this one's tag, is ignored
    other = {peer_id_of(keys[2]): verdict_statement(keys[2], "ee" * 32, accused)}
    assert majority_verdict(accusation, other, members) is None
    # members that can't judge it (they dropped its weights) say so: once every other member of the round
    # has and nobody voted, no verdict can come, and it settles without a ban instead of waiting forever
    assert majority_verdict(accusation, votes((keys[2], CANNOT_JUDGE)), members) is None  # fourth: not yet
    unable = votes((keys[2], CANNOT_JUDGE), (keys[3], CANNOT_JUDGE))
    guilty, why = majority_verdict(accusation, unable, members)
    assert guilty == GOOD_FAITH and "no verdict can come" in why
    one_voted = votes((keys[2], CANNOT_JUDGE), (keys[3], accused))
    assert majority_verdict(accusation, one_voted, members)[0] == accused
    # a round of the two parties alone: nobody of the round says so; live members of the group may judge
    pair = dict(accusation, evidence=commits[:2])
    assert majority_verdict(pair, votes((keys[2], CANNOT_JUDGE)), members) is None


def test_members_judge_only_gradients_of_weights_they_share(keys):
    """Rounds average gradients, so two members' weights are equal only while they took part in every round
    together since a common start (the checkpoint, or one loading the other's state). A member that stepped
    alone, or a peer that missed a round, holds weights of its own from then on: recomputing with them, or
    against them, would accuse an honest peer (two honest trainers that each stepped alone at step 1 and
    then shared rounds accused each other at step 3, by 1.4% of the gradient's norm), so neither is judged."""
    validator = GradientValidator(SimpleNamespace(log=ContributionLog()), None, RUN, PREFIX, 1024)
    bans = SimpleNamespace(gradient_judge=None, banned=set)  # what GroupValidation reads of the run's bans

    def round_at(step: int, *members: str) -> SimpleNamespace:
        return SimpleNamespace(members=list(members), transcript=SimpleNamespace(step=step), seed=None)

    loop = asyncio.new_event_loop()
    try:
        group = GroupValidation(validator, bans, None, keys[0], "me", 1, loop)
        assert validator.same_weights == group.same_weights and bans.gradient_judge == group.judge
        assert group.same_weights("peer", 0) is None  # the run's checkpoint: the same for everyone
        group.loaded_state(0, "donor")  # joining before the first step: the checkpoint's weights still
        assert group.same_weights("peer", 0) is None
        for step in (0, 1):
            group.on_round(round_at(step, "me", "peer", "other"))
        group.on_round(round_at(2, "me", "peer"))  # "other" missed the round at step 2
        assert group.same_weights("peer", 3) is None and group.same_weights("peer", 2) is None
        assert group.same_weights("other", 2) is None
        assert "other missed a round" in group.same_weights("other", 3)
        group.on_round(round_at(3, "me", "peer", "other"))  # back in the rounds, but not in the weights
        assert "other missed a round" in group.same_weights("other", 4)
        assert group.same_weights("peer", 4) is None
        # this member steps alone at step 4 (no round): its weights of step 5 on are its own
        assert "its own" in group.same_weights("peer", 5)
        group.on_round(round_at(5, "me", "peer"))
        assert "its own" in group.same_weights("peer", 5) and "missed a round" in group.same_weights(
            "peer", 6
        )
        # loading another member's state makes this member's weights that member's, and only that one's
        group.loaded_state(6, "peer")
        group.on_round(round_at(6, "me", "peer", "other"))
        assert group.same_weights("peer", 7) is None and "other missed" in group.same_weights("other", 7)
        for step in range(7, 20):  # the record runs on past the last rounds remembered
            group.on_round(round_at(step, "me", "peer"))
        assert group.same_weights("peer", 20) is None
        assert "its own" in group.same_weights("peer", 7)  # too old to tell
        assert group.same_weights("peer", 0) is None  # the checkpoint's never is
    finally:
        loop.close()


def _trainer(checkpoint) -> TrainerRecomputer:
    head = load_client_head(checkpoint, dtype=torch.float32)
    trainable = TrainableParameters(
        [(EMBED, head.embed_tokens.weight), (NORM, head.norm.weight), (LM_HEAD, head.lm_head.weight)],
        lr=1e-2,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        clip_grad_norm=1.0,
    )

    async def on_compute(fn, *args):
        return fn(*args)

    return TrainerRecomputer(head, trainable, RUN, num_stages=2, on_compute=on_compute)


def _trainer_microbatch(trainer: TrainerRecomputer, stage_key, ids, flip: bool = False) -> None:
    """What SwarmTrainer does per microbatch, with stage replies signed by `stage_key`."""
    head, params, step = trainer.head, trainer.trainable.params, trainer.trainable.step
    hidden = torch.randn(*ids.shape, head.embed_tokens.weight.shape[1])
    labels = (head.lm_head.weight.shape[0] - 1 - ids[:, 1:]) if flip else ids[:, 1:]
    _, grad_hidden, grads = loss_gradients(head, params, ids, hidden, labels)
    trainer.trainable.accumulate(grads, 0)
    receipt = sign_reply(stage_key, RUN, 1, "forward", torch.randn_like(hidden), hidden)
    trainer.log.add(Microbatch("head", {"ids": ids, "hidden": hidden}, [receipt], step))
    grad = torch.randn_like(hidden)  # the first stage's input gradient
    trainer.trainable.accumulate(embedding_gradients(head, params, ids, grad), ids.shape[0])
    receipt = sign_reply(stage_key, RUN, 0, "backward", torch.randn_like(hidden), grad)
    trainer.log.add(Microbatch("embed", {"ids": ids, "grad": grad}, [receipt], step))


def test_a_trainers_gradient_is_recomputed_from_its_ids_and_the_stage_replies(tiny_model, keys):
    checkpoint = resolve_checkpoint(str(tiny_model))
    honest, flipper, validator = _trainer(checkpoint), _trainer(checkpoint), _trainer(checkpoint)
    ids = torch.randint(0, 256, (3, 6), generator=torch.Generator().manual_seed(0))
    for trainer, flip in ((honest, False), (flipper, True)):
        torch.manual_seed(1)  # the same stage replies for both
        _trainer_microbatch(trainer, keys[2], ids, flip)
        trainer.log.close(0)
        sent, samples = trainer.trainable.take_mean_gradients()
        trainer.log.record_sent(0, sent)
        assert samples == 3
    weights = {0: validator.log.weights(0)}
    for microbatch in honest.log.get(0).microbatches:
        validator.check_microbatch(microbatch)
    expected = asyncio.run(validator.recompute(honest.log.get(0).microbatches, weights))
    assert relative_error(honest.log.get(0).sent, expected) == 0.0
    flipped = asyncio.run(validator.recompute(flipper.log.get(0).microbatches, weights))
    assert relative_error(flipper.log.get(0).sent, flipped) > VALIDATION_RTOL  # label_flip shows
    head_part = honest.log.get(0).microbatches[0]
    with pytest.raises(InvalidStatement):  # activations other than the stage returned
        validator.check_microbatch(
            Microbatch(
                "head",
                {**head_part.tensors, "hidden": head_part.tensors["hidden"] * 2},
                head_part.receipts,
                0,
            )
        )


def test_kept_none_is_proof_only_for_rounds_a_peer_must_still_keep(keys):
    """Peers keep their last KEEP_STEPS rounds. "Kept none" for one that recent convicts; for an older one the
    validator asked too late (its checks queue up under load) and may not accuse: an honest peer was banned
    that way, by a validation that ran 10 rounds after its round."""

    from swarm.training.state import TrainStateServicer
    from swarm.training.validation import KEEP_STEPS, CannotJudge

    peer, validator = _backend(), _backend()
    withheld = KEEP_STEPS + 1  # a recent round the peer claims it has not kept
    for step in range(KEEP_STEPS + 3):
        _backward(peer, keys[1], 1)
        grads, _ = peer.take_gradients()
        peer.log.record_sent(step, grads)
        peer.apply(grads)
        validator.log.close(step)
    assert peer.log.get(1) is None and peer.log.get(withheld) is not None

    def commit(step: int) -> bytes:
        return sign_statement(keys[1], commit_payload(PREFIX, step, [digest(b"chunk")], digest(b"secret")))

    async def run():
        server, client = await _server_and_client(keys[1])
        try:
            servicer = TrainStateServicer(
                RUN, None, lambda: (0, 0, []), lambda step: None if step == withheld else peer.log.get(step)
            )
            servicer.stage_prefix = PREFIX  # the stage it trains: it answers for that stage's rounds
            await servicer.add_p2p_handlers(server)
            checker = GradientValidator(validator, client, RUN, PREFIX, 1024, timeout=10.0)
            accused = peer_id_of(keys[1])
            assert server.peer_id.to_base58() == accused
            with pytest.raises(CannotJudge, match="too late"):
                await checker.check(accused, 1, commit(1))
            guilty, why = await checker.check(accused, withheld, commit(withheld))
            assert guilty == accused and "kept no contribution" in why
            # once it trains another stage, what its new stage's log holds (or lacks) is no proof about its
            # rounds here: a validator of this stage can't judge them, and accuses nobody
            servicer.stage_prefix = PREFIX + "-another-stage"
            with pytest.raises(CannotJudge, match="moved to another stage"):
                await checker.check(accused, withheld, commit(withheld))
        finally:
            await client.shutdown()
            await server.shutdown()

    asyncio.run(run())


async def _server_and_client(server_key):
    """Two P2P peers on 127.0.0.1: one with `server_key`'s identity, and one connected to it."""
    from hivemind.p2p import P2P

    from swarm.dht.identity import temporary_identity_file

    server = await P2P.create(
        host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=temporary_identity_file(server_key)
    )
    client = await P2P.create(
        host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server.get_visible_maddrs()
    )
    return server, client


def test_a_judge_holds_the_weights_of_an_accused_round_until_it_has_judged(keys):
    """Under load rounds move on while an accusation is judged: a judge that dropped the weights of the
    accused step could never judge it (a lazy peer escaped that way: its accusation of step 0 reached the
    third stage peer after step 0's weights had rolled out, or after it resynced at step 1). From when the
    judge and the accused see the accusation they hold that step past the window; the judge convicts after
    KEEP_STEPS + 2 more rounds, then releases it, and the accused holds its own for the other judges'
    games."""

    from swarm.averaging.commitments import chunk_digests
    from swarm.training.state import TrainStateServicer
    from swarm.training.validation import KEEP_STEPS, CannotJudge

    peer, judge = _backend(), _backend()  # the same checkpoint: the group's weights of step 0
    accused, accuser = peer_id_of(keys[1]), peer_id_of(keys[0])
    loop = asyncio.new_event_loop()
    bans = SimpleNamespace(gradient_judge=None, banned=set)
    groups = [
        GroupValidation(GradientValidator(b, None, RUN, PREFIX, 1024), bans, None, keys[2], own, 1, loop)
        for b, own in ((peer, accused), (judge, "judge"))
    ]

    def commit(step: int, sent) -> bytes:
        return sign_statement(keys[1], commit_payload(PREFIX, step, chunk_digests(sent, 1024), digest(b"s")))

    commits = {}
    for step in range(KEEP_STEPS + 3):
        _backward(peer, keys[3], 1)
        grads, _ = peer.take_gradients()
        sent = [torch.zeros_like(g) for g in grads] if step == 0 else grads  # lazy at step 0
        peer.log.record_sent(step, sent)
        commits[step] = commit(step, sent)
        judge.log.close(step)
        for backend in (peer, judge):
            backend.apply(grads)  # the group's aggregate: both keep the same weights
        if step == 0:  # the judge resyncs (it loads the group's state): step 0's weights are the checkpoint's
            judge.log.restart(judge.trainable.step, judge.trainable.params)
            assert judge.log.weights(0) is not None
            # the accusation of step 0 is seen (RunBans.refresh calls hold_for before judging)
            blob = make_accusation(keys[0], BAD_GRADIENT, accused, PREFIX, 0, b"g", 0, [commits[0]])
            accusation = {"accuser": accuser, "accused": accused, "accusation": digest(blob).hex()}
            accusation.update(prefix=PREFIX, step=0, evidence=[commits[0]])
            for group in groups:
                group.hold_for(accusation)
    assert judge.log.weights(1) is None and judge.log.weights(0) is not None  # held past the window
    assert peer.log.get(1) is None and peer.log.get(0) is not None

    async def run():
        server, client = await _server_and_client(keys[1])
        try:
            await TrainStateServicer(RUN, None, lambda: (0, 0, []), peer.log.get).add_p2p_handlers(server)
            groups[1].validator.p2p = client
            guilty, why = await groups[1].judge(accusation)
            assert guilty == accused and "differs from the recomputation" in why
            # a round nobody accused in time rolled out: no verdict either way
            with pytest.raises(CannotJudge, match="too late|no longer holds"):
                await groups[1].validator.check(accused, 1, commits[1])
        finally:
            await client.shutdown()
            await server.shutdown()

    try:
        asyncio.run(run())
    finally:
        loop.close()
    assert judge.log.held() == set()  # judged: the judge let step 0 go
    assert peer.log.held() == {0}  # the accused still shows it to the other judges


def test_members_stop_holding_for_a_banned_accuser_and_within_the_budget(keys, caplog):
    """The accused of a false accusation holds its steps for the judges' games until its accuser is banned
    (a flood of false accusations can't keep its budget full); beyond the budget it holds nothing more and
    says so."""
    log = ContributionLog(keep=3, max_held=2)
    for step in range(3):
        log.snapshot(step, [torch.zeros(1)])
    banned: set[str] = set()
    bans = SimpleNamespace(gradient_judge=None, banned=lambda: set(banned))
    validator = GradientValidator(SimpleNamespace(log=log), None, RUN, PREFIX, 1024)
    loop = asyncio.new_event_loop()
    loop.close()  # hold_for starts nothing on it
    group = GroupValidation(validator, bans, None, keys[0], "me", 1, loop)

    def seen(accusation: str, accuser: str, step: int) -> None:
        group.hold_for(
            {"accusation": accusation, "accuser": accuser, "accused": "me", "prefix": PREFIX, "step": step}
        )

    seen("aa", "liar", 1)
    assert log.held() == {0, 1}
    with caplog.at_level("WARNING", logger="swarm.training.validation"):
        seen("bb", "liar", 2)  # {0, 1, 2}: over the budget
    assert log.held() == {0, 1} and "not holding steps [1, 2]" in caplog.text
    group.hold_for({"accusation": "cc", "accuser": "x", "accused": "me", "prefix": "other", "step": 2})
    assert log.held() == {0, 1}  # another group's accusation: not this member's to hold
    banned.add("liar")  # its accusation was judged false
    seen("dd", "honest", 2)
    assert log.held() == {1, 2}
