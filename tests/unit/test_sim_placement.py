"""The placement simulator on a small swarm: traces are reproducible and as stated, fractions are fractions,
and rebalancing does what each rule promises (the 1,000-node run is benchmarks/sim_placement.py)."""

import random

import numpy as np
import pytest

from swarm.node.placement import choose_start
from swarm.sim.churn import MEAN_LIFETIME_MINUTES, correlated_trace, exponential_trace
from swarm.sim.inference import INFERENCE_POLICIES, run_inference
from swarm.sim.petals import fast_choose_start
from swarm.sim.training import TRAINING_POLICIES, run_training

NODES, MINUTES, SEED = 40, 90, 0


@pytest.fixture(scope="module")
def traces():
    return {
        "exponential": exponential_trace(NODES, MINUTES, SEED),
        "correlated": correlated_trace(NODES, MINUTES, SEED, outage_every=60, first_outage=30),
    }


def test_traces_are_deterministic_per_seed_and_keep_the_stated_lifetime():
    assert exponential_trace(NODES, MINUTES, 3) == exponential_trace(NODES, MINUTES, 3)
    assert correlated_trace(NODES, MINUTES, 3) == correlated_trace(NODES, MINUTES, 3)
    assert exponential_trace(NODES, MINUTES, 3) != exponential_trace(NODES, MINUTES, 4)

    big = exponential_trace(1000, 180, 1)
    lifetimes = [s.lifetime for s in big.sessions]
    assert sum(lifetimes) / len(lifetimes) == pytest.approx(MEAN_LIFETIME_MINUTES, rel=0.06)
    online_at_two_hours = sum(s.arrive <= 120 < s.leave for s in big.sessions)
    assert 850 < online_at_two_hours < 1150  # arrivals keep the population near its start


def test_the_correlated_trace_takes_a_whole_region_down_and_brings_it_back():
    trace = correlated_trace(1000, 120, 2)
    start, end, region = trace.outages[0]
    online = [s for s in trace.sessions if s.arrive <= start - 1 < s.leave]
    during = [s for s in trace.sessions if s.arrive <= (start + end) / 2 < s.leave]
    assert any(s.region == region for s in online)
    assert not any(s.region == region for s in during)
    assert 0.15 < 1 - len(during) / len(online) < 0.4
    back = {s.machine for s in trace.sessions if s.arrive == end and s.region == region}
    assert back and back <= {s.machine for s in online} | {
        s.machine for s in trace.sessions if s.arrive > start
    }


def test_the_petals_what_if_pass_chooses_as_choose_start_does():
    rng = random.Random(5)
    for _ in range(500):
        num_blocks = rng.choice([4, 9, 80])
        length = rng.randint(1, num_blocks)
        totals = [rng.choice([0.0, 1.0, 2.0, rng.uniform(0, 3)]) for _ in range(num_blocks)]
        throughput = rng.choice([1.0, rng.uniform(0.1, 2)])
        assert fast_choose_start(np.array(totals), length, throughput) == choose_start(
            totals, length, throughput
        )


@pytest.mark.parametrize("workload", ["inference", "training"])
def test_every_policy_gives_fractions_and_only_rebalancing_reloads(traces, workload):
    policies, run_policy = (
        (INFERENCE_POLICIES, run_inference) if workload == "inference" else (TRAINING_POLICIES, run_training)
    )
    for trace in traces.values():
        runs = {name: run_policy(trace, policy, SEED) for name, policy in policies.items()}
        for run in runs.values():
            assert len(run.fractions) == MINUTES
            assert all(0.0 <= f <= 1.0 for f in run.fractions)
            assert sum(run.fractions) / MINUTES > 0.3
            assert run.joins == runs["no rebalancing"].joins > 0
        assert runs["no rebalancing"].reloads == 0
        # the same seed, the same run
        again = run_policy(trace, next(iter(policies.values())), SEED)
        assert again.fractions == runs["no rebalancing"].fractions


def test_at_a_thousand_peers_only_the_paying_rule_still_moves_training_peers():
    # plan_move's threshold (a third of the bottleneck, as the node passes it) is out of any one peer's reach
    # in stages of ~125 peers, so its run matches no rebalancing move for move; the paying rule's (half the
    # mover's own throughput) is not
    trace = exponential_trace(1000, 120, SEED)
    none = run_training(trace, TRAINING_POLICIES["no rebalancing"], SEED)
    ours = run_training(trace, TRAINING_POLICIES["ours (plan_move)"], SEED)
    paying = run_training(trace, TRAINING_POLICIES["paying (plan_move_paying)"], SEED)
    assert ours.reloads == 0 and ours.fractions == none.fractions
    assert paying.reloads > 0
