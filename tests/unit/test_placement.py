"""Choosing spans: raise the bottleneck, prefer uncovered blocks, move only when it pays enough."""

import pytest

from swarm.node.placement import block_throughputs, bottleneck, choose_start, should_move
from swarm.proto import swarm_pb2


def info(peer, start, end, throughput, state=swarm_pb2.ServerInfo.ONLINE):
    return swarm_pb2.ServerInfo(
        peer_id=peer, start_block=start, end_block=end, throughput=throughput, state=state
    )


def test_block_throughputs_sum_serving_nodes_and_skip_offline_and_self():
    servers = [
        info("a", 0, 4, 10),
        info("b", 2, 6, 5, swarm_pb2.ServerInfo.JOINING),
        info("c", 0, 6, 100, swarm_pb2.ServerInfo.OFFLINE),
        info("me", 0, 6, 7),
    ]
    assert block_throughputs(servers, 6, exclude="me") == [10, 10, 15, 15, 5, 5]


def test_an_announced_move_counts_where_the_node_goes_and_the_lower_peer_id_wins_a_tie():
    """Blocks [0, 6) lost their nodes; a and b both serve [6, 12). Once a announced its move, b sees the
    gap filled and stays; when both announced at once, each re-checks with the tie-break and only a (the
    lower id) goes."""
    a_moving = info("a", 6, 12, 10)
    a_moving.moving_to_start = 0
    b_moving = info("b", 6, 12, 10)
    b_moving.moving_to_start = 0
    assert block_throughputs([a_moving], 12, exclude="b") == [10] * 6 + [0] * 6
    assert should_move(block_throughputs([a_moving], 12, exclude="b"), 6, 6, 10, 0.75) is None
    # both announced: a ignores b's move (b yields to it), b counts a's
    for_a = block_throughputs([b_moving], 12, exclude="a", moves_yielded_to="a")
    for_b = block_throughputs([a_moving], 12, exclude="b", moves_yielded_to="b")
    assert should_move(for_a, 6, 6, 10, 0.75) == 0
    assert should_move(for_b, 6, 6, 10, 0.75) is None
    # a move to the block 0 start is a set field, not proto3's default
    assert not info("c", 6, 12, 10).HasField("moving_to_start")


def test_first_node_takes_the_start_then_others_fill_the_gaps():
    assert choose_start([0.0] * 12, 6, 10) == 0
    assert choose_start([10.0] * 6 + [0.0] * 6, 6, 10) == 6
    # a gap in the middle wins over the ends
    assert choose_start([10, 10, 10, 0, 0, 10, 10, 10], 2, 10) == 3


def test_choice_raises_the_bottleneck():
    throughputs = [30, 30, 5, 20, 20, 20]
    start = choose_start(throughputs, 2, 10)
    assert start in (1, 2)
    after = list(throughputs)
    for b in range(start, start + 2):
        after[b] += 10
    assert bottleneck(after) == 15


def test_should_move_when_a_block_has_no_node_and_not_when_balanced():
    without_me = [10.0] * 6 + [0.0] * 6
    assert should_move(without_me, 0, 6, 10, 0.75) == 6  # blocks 6.. have nobody: move at once
    balanced = [10.0] * 12
    assert should_move(balanced, 0, 6, 10, 0.75) is None
    assert should_move(without_me, 0, 6, 10, 0.0) is None  # 0 disables rebalancing


def test_should_move_respects_balance_quality():
    # moving from [0, 2) to [4, 6) turns a bottleneck of 10 into 19
    without_me = [20, 20, 20, 20, 9, 9]
    assert should_move(without_me, 0, 2, 10, 0.75) == 4
    # a small gain (bottleneck 18 -> 19) is not worth a move
    assert should_move([20, 20, 20, 20, 18, 18], 0, 2, 1, 0.75) is None


def test_choose_start_rejects_impossible_spans():
    with pytest.raises(ValueError):
        choose_start([0.0] * 4, 5, 1)


def test_damped_rule_moves_at_scale_where_the_ratio_rule_never_would():
    from swarm.node.placement import should_move_damped

    # hundreds of nodes per block: one node cannot change the bottleneck by 25%, but it can lift a dip by
    # its whole throughput (97 -> 98)
    without_me = [100.0] * 6 + [97.0, 97.0] + [100.0] * 2
    assert should_move(without_me, 0, 2, 1.0, 0.75) is None
    assert should_move_damped(without_me, 0, 2, 1.0, chance=0.0) == 6
    # only a few of the nodes that see the dip go: about a fifth of the missing throughput per period
    assert should_move_damped(without_me, 0, 2, 1.0, chance=0.5) is None
    # a move that lifts the bottleneck by less than the node's throughput (99.5 -> 100) is not worth a reload
    shallow = [100.0] * 6 + [99.5, 99.5] + [100.0] * 2
    assert should_move_damped(shallow, 0, 2, 1.0, chance=0.0) is None
    # where it already is best, it stays
    assert should_move_damped(without_me, 6, 2, 1.0, chance=0.0) is None


def test_damped_rule_covers_an_empty_block_whatever_the_draw():
    from swarm.node.placement import should_move_damped

    assert should_move_damped([5.0, 5.0, 5.0, 0.0], 0, 1, 1.0, chance=0.999) == 3
