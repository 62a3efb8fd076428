"""Training stage placement: join the weakest stage; one peer moves when it raises the bottleneck enough."""

import pytest

from swarm.training.balance import StagePeer, choose_stage, move_pays, plan_move, stage_totals, with_moves


def stage(*throughputs, prefix="p", queue=0):
    return [StagePeer(f"{prefix}{i}", t, queue) for i, t in enumerate(throughputs)]


def test_newcomers_join_the_weakest_stage_then_the_busier_then_the_smaller():
    assert choose_stage([stage(10, 10), stage(5)]) == 1
    assert choose_stage([[], stage(5)]) == 0
    # equal throughput: the stage whose queues are longer needs help more
    assert choose_stage([stage(5, prefix="a"), stage(5, prefix="b", queue=4)]) == 1
    assert choose_stage([stage(5, 0), stage(5)]) == 1  # an unmeasured peer still counts, a bit
    with pytest.raises(ValueError):
        choose_stage([])


def test_three_to_one_moves_exactly_one_peer_and_only_it():
    stages = [stage(10, 10, 10, prefix="a"), stage(10, prefix="b")]
    moves = {p.peer_id: plan_move(stages, p.peer_id) for peers in stages for p in peers}
    assert list(moves.values()).count(1) == 1
    assert all(target in (None, 1) for target in moves.values())
    mover = next(peer for peer, target in moves.items() if target == 1)
    after = [[p for p in stages[0] if p.peer_id != mover], stages[1] + [StagePeer(mover, 10)]]
    assert stage_totals(after) == [20, 20]
    # balanced now: nobody moves, over and over
    assert all(plan_move(after, p.peer_id) is None for peers in after for p in peers)


def test_no_move_below_the_gain_threshold_nor_out_of_a_lone_stage():
    # moving the 2 would give min(10, 12) = 10 > 9, an 11% gain: only above a 10% threshold
    stages = [stage(10, 2, prefix="a"), stage(9, prefix="b")]
    assert plan_move(stages, "a1", min_gain=0.1) == 1
    assert plan_move(stages, "a1", min_gain=0.2) is None
    assert plan_move([stage(30, prefix="a"), stage(1, prefix="b")], "a0") is None
    assert plan_move([stage(30, prefix="a")], "a0") is None


def test_the_mover_is_the_peer_whose_move_helps_most():
    # moving the 8 balances best (12 vs 13); the 3 would leave the gap; the 20 would empty the other side
    stages = [stage(20, 8, 3, prefix="a"), stage(5, prefix="b")]
    assert plan_move(stages, "a1") == 1
    assert plan_move(stages, "a0") is None and plan_move(stages, "a2") is None


def test_an_empty_stage_draws_a_peer_at_once():
    stages = [stage(4, 4, prefix="a"), [], stage(4, 4, prefix="c")]
    targets = {p.peer_id: plan_move(stages, p.peer_id) for peers in stages for p in peers}
    assert sorted(t for t in targets.values() if t is not None) == [1]


def test_paying_rule_rebalances_a_large_run_where_the_relative_threshold_never_fires():
    from swarm.training.balance import plan_move_paying

    # a hundred peers a stage: the weakest is short by ten peers, yet one move gains only 1/90 < 10%
    stages = [stage(*[1.0] * 100, prefix=f"s{s}") for s in range(3)] + [stage(*[1.0] * 90, prefix="w")]
    everyone = [p.peer_id for peers in stages for p in peers]
    assert all(plan_move(stages, me) is None for me in everyone)
    targets = {me: plan_move_paying(stages, me) for me in everyone}
    movers = {me: t for me, t in targets.items() if t is not None}
    assert list(movers.values()) == [3] and len(movers) == 1


def test_paying_rule_leaves_a_balanced_run_alone():
    from swarm.training.balance import plan_move_paying

    balanced = [stage(*[1.0] * 10, prefix="a"), stage(*[1.0] * 10, prefix="b")]
    nearly = [stage(*[1.0] * 10, prefix="a"), stage(*[1.0] * 9, 0.6, prefix="b")]
    for stages in (balanced, nearly):
        assert all(plan_move_paying(stages, p.peer_id) is None for peers in stages for p in peers)


def test_a_peer_that_announced_a_move_counts_where_it_goes_so_no_second_peer_follows():
    stages = [stage(10, 10, 10, prefix="a"), stage(10, prefix="b")]
    assert [plan_move(stages, f"a{i}") for i in range(3)] == [1, None, None]
    # while a0 loads stage 1, queue lengths change, so a1 or a2 may be the peer chosen by the next read: with
    # a0 counted in stage 1, nobody is
    counted = with_moves(stages, [(1, StagePeer("a0", 10))])
    assert [sorted(p.peer_id for p in peers) for peers in counted] == [["a1", "a2"], ["a0", "b0"]]
    assert all(plan_move(counted, p.peer_id) is None for peers in counted for p in peers)


def test_a_move_is_called_off_once_another_peer_filled_the_gap():
    stages = [stage(10, 10, 10, prefix="a"), stage(10, prefix="b")]
    assert move_pays(stages, "a1", 1)
    assert not move_pays(with_moves(stages, [(1, StagePeer("a0", 10))]), "a1", 1)
    assert not move_pays(stages, "b0", 0)  # out of a lone stage
    assert not move_pays(stages, "nobody", 1)
