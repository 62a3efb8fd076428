"""Route choice: min-latency chains for inference and throughput-weighted chains for batches."""

import random
from collections import Counter

import pytest

from swarm.client.errors import MissingBlocksError
from swarm.client.routing import (
    MAX_OVER_MEASURED,
    MAX_OVER_MEDIAN,
    believed,
    min_latency_route,
    throughput_weighted_route,
)
from swarm.proto import swarm_pb2


def info(peer, start, end, throughput):
    return swarm_pb2.ServerInfo(peer_id=peer, start_block=start, end_block=end, throughput=throughput)


def spans(route):
    return [(s.peer_id, s.start, s.end) for s in route]


def test_fewer_hops_win_when_compute_is_equal():
    servers = [info("whole", 0, 6, 10), info("a", 0, 3, 20), info("b", 3, 6, 20)]
    rtts = {"whole": 0.01, "a": 0.01, "b": 0.01}
    assert spans(min_latency_route(servers, 0, 6, rtts)) == [("whole", 0, 6)]


def test_a_distant_node_is_avoided():
    servers = [info("whole", 0, 6, 10), info("a", 0, 3, 20), info("b", 3, 6, 20)]
    rtts = {"whole": 0.5, "a": 0.01, "b": 0.01}
    assert spans(min_latency_route(servers, 0, 6, rtts)) == [("a", 0, 3), ("b", 3, 6)]


def test_a_slow_node_is_avoided_and_routes_may_enter_mid_span():
    servers = [info("slow", 0, 4, 0.5), info("fast", 0, 2, 100), info("tail", 1, 6, 100)]
    rtts = {peer: 0.001 for peer in ("slow", "fast", "tail")}
    # per-block costs: fast 5 ms, tail 2 ms, so tail takes over as early as it can
    assert spans(min_latency_route(servers, 0, 6, rtts)) == [("fast", 0, 1), ("tail", 1, 6)]
    assert spans(min_latency_route(servers, 2, 5, rtts)) == [("tail", 2, 5)]


def test_missing_blocks_are_named():
    servers = [info("a", 0, 2, 1), info("b", 4, 6, 1)]
    with pytest.raises(MissingBlocksError) as error:
        min_latency_route(servers, 0, 6, {})
    assert error.value.missing == [2, 3]
    with pytest.raises(MissingBlocksError):
        throughput_weighted_route(servers, 0, 6)


def test_batches_spread_over_replicas_by_throughput():
    servers = [info("big", 0, 6, 30), info("small", 0, 6, 10)]
    rng = random.Random(0)
    counts = Counter(throughput_weighted_route(servers, 0, 6, rng)[0].peer_id for _ in range(4000))
    assert 0.70 < counts["big"] / 4000 < 0.80  # 30 / (30 + 10) = 0.75


def test_a_node_announcing_absurd_throughput_does_not_draw_all_traffic():
    honest = [info(f"honest{i}", 0, 6, 100.0) for i in range(3)]
    liar = info("liar", 0, 6, 1e300)
    servers = believed([*honest, liar])
    assert servers[-1].throughput == pytest.approx(MAX_OVER_MEDIAN * 100.0)  # capped at 10x the median
    assert liar.throughput == 1e300  # the announcement itself is left alone
    assert servers[:3] == honest  # honest claims stand
    rng = random.Random(0)
    picks = Counter(throughput_weighted_route(servers, 0, 6, rng)[0].peer_id for _ in range(2000))
    assert picks["liar"] < 0.85 * 2000 and all(picks[f"honest{i}"] > 100 for i in range(3))
    # once measured, a node is believed at most 10x what the client saw of it (block-tokens per second)
    measured = believed([*honest, liar], {"liar": 6.0})
    assert measured[-1].throughput == pytest.approx(MAX_OVER_MEASURED * 6.0 / 6)
    assert min_latency_route(measured, 0, 6)[0].peer_id != "liar"
    # non-finite or negative claims count as nothing
    weird = believed([info("nan", 0, 6, float("nan")), info("neg", 0, 6, -5.0), *honest])
    assert weird[0].throughput == 0.0 and weird[1].throughput == 0.0
