"""Petals' rebalancing rule (its `block_selection`, as REFERENCES.md describes it), built from our own
primitives, as the baseline the simulator compares against.

Every uniform(0, 2 x 120 s) a server takes its own span out; if the best start (our `choose_start`) is where
it is, it stays. Otherwise it imagines every server greedily re-placing itself until none moves, and moves
when the bottleneck now is below 0.75 of the bottleneck after that.

That what-if pass costs one `choose_start` per server, so with a thousand servers the simulator runs it once
every `PETALS_WHAT_IF_MINUTES` simulated minutes and shares it among the servers that check meanwhile (one
server's own move changes it by about a thousandth; the swarm's balance drifts over tens of minutes), with a
vectorized twin of `choose_start` that a test holds to the same answers, and at most `MAX_PASSES` passes
over the servers.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from swarm.node.placement import bottleneck, choose_start, with_span

PETALS_BALANCE_QUALITY = 0.75
PETALS_BALANCE_PERIOD_MINUTES = 2.0  # checks every uniform(0, 2 x period)
MAX_PASSES = 3
PETALS_WHAT_IF_MINUTES = 5  # how long the simulator reuses one what-if pass


def fast_choose_start(totals: np.ndarray, length: int, throughput: float) -> int:
    """`swarm.node.placement.choose_start`, vectorized: the same start for the same inputs."""
    num_blocks = len(totals)
    windows = sliding_window_view(totals, length)
    starts = np.arange(num_blocks - length + 1)
    prefix_min = np.concatenate(([np.inf], np.minimum.accumulate(totals)))  # min of totals[:s]
    suffix_min = np.concatenate((np.minimum.accumulate(totals[::-1])[::-1], [np.inf]))  # min of totals[s:]
    # adding a constant keeps the order, so the window's new minimum is its old one plus the throughput
    after = np.minimum(
        windows.min(axis=1) + throughput, np.minimum(prefix_min[starts], suffix_min[starts + length])
    )
    candidates = np.flatnonzero(after == after.max())
    if len(candidates) > 1:
        uncovered = (windows[candidates] <= 0).sum(axis=1)
        candidates = candidates[uncovered == uncovered.max()]
    if len(candidates) > 1:
        weakest_first = np.sort(windows[candidates], axis=1)
        candidates = candidates[
            np.lexsort(weakest_first.T[::-1])
        ]  # stable: equal windows keep the lowest start
    return int(candidates[0])


def settled_bottleneck(
    num_blocks: int, spans: Sequence[tuple[int, int, float]], rng: random.Random, max_passes: int = MAX_PASSES
) -> float:
    """The bottleneck once every server (start, length, throughput) has greedily re-placed itself, in a random
    order each pass, until none moves (or `max_passes` passes)."""
    starts = [start for start, _, _ in spans]
    totals = np.zeros(num_blocks)
    for (_, length, throughput), start in zip(spans, starts, strict=True):
        totals[start : start + length] += throughput
    order = list(range(len(spans)))
    for _ in range(max_passes):
        rng.shuffle(order)
        moved = False
        for index in order:
            _, length, throughput = spans[index]
            start = starts[index]
            totals[start : start + length] -= throughput
            best = fast_choose_start(totals, length, throughput)
            totals[best : best + length] += throughput
            if best != start:
                starts[index], moved = best, True
        if not moved:
            break
    return float(totals.min())


def petals_should_move(
    throughputs: list[float],
    current_start: int,
    length: int,
    throughput: float,
    settled: Callable[[], float],
    balance_quality: float = PETALS_BALANCE_QUALITY,
) -> int | None:
    """The start a Petals server moves to, or None. `throughputs` count this server; `settled()` gives the
    bottleneck after the greedy what-if pass (called only when needed)."""
    initial = bottleneck(throughputs)
    without_me = with_span(throughputs, current_start, length, -throughput)
    best_start = choose_start(without_me, length, throughput)
    if best_start == current_start:
        return None
    after = settled()
    if after <= 0 or after < initial:
        return None
    return best_start if initial / after < balance_quality else None
