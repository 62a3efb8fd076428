"""SWARM's stochastic wiring: the least busy peer gets the next task; newcomers neither flood nor starve."""

from __future__ import annotations

from collections import Counter

import pytest

from swarm.training.wiring import StageWiring


def test_tasks_spread_in_proportion_to_throughput():
    wiring = StageWiring()
    peers = {"fast": 30.0, "slow": 10.0}
    counts = Counter(wiring.choose(peers, 4) for _ in range(400))
    assert counts["fast"] == pytest.approx(300, abs=4) and counts["slow"] == pytest.approx(100, abs=4)


def test_backward_costs_more_than_forward():
    wiring = StageWiring()
    peers = {"a": 10.0, "b": 10.0}
    first = wiring.choose(peers, 4, backward=True)
    # a backward on `first` weighs 2.5 forwards: the other peer takes the next two forwards
    assert [wiring.choose(peers, 4), wiring.choose(peers, 4)] == [p for p in peers if p != first] * 2


def test_newcomer_enters_at_the_minimum_with_the_stage_typical_speed():
    wiring = StageWiring()
    for _ in range(50):
        peer = wiring.choose({"old": 0.0}, 4)
        wiring.measured(peer, 4, 0.04)  # 100 samples/s
    peers = {"old": 0.0, "new": 0.0}  # the newcomer announced nothing yet
    counts = Counter(wiring.choose(peers, 4) for _ in range(100))
    assert 40 <= counts["new"] <= 60  # not starved by a default speed, not flooded by a zero busy time


def test_measured_speed_moves_the_estimate_and_forget_drops_a_peer():
    wiring = StageWiring()
    wiring.choose({"a": 10.0}, 4)
    wiring.measured("a", 4, 0.01)  # 400 samples/s measured
    assert wiring._throughput["a"] > 10.0
    wiring.forget("a")
    with pytest.raises(LookupError):
        wiring.choose({}, 4)
