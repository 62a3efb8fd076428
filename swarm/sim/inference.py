"""Inference placement, stepped one minute at a time: nodes pick spans with `choose_start` when they join and
re-check by their policy while they serve.

Loading a span takes `load_minutes(length)` (1 min plus 0.15 min per block: 2.5 min for 10 blocks, 10 min for
60). A joining node is announced (JOINING, so others plan around it) but serves nothing until loaded. How a
node moves depends on the software: ours loads the new span while serving the old one and switches its record
when ready (`swarm.node.server.Server._move`); a Petals server stops, announces its new span and serves
nothing until that is loaded.

The fraction of optimal each minute is the bottleneck of the spans actually served over the bound
sum(throughput x span length) / blocks over every node online (loading or not): what the swarm would give if
all its nodes served and the blocks' totals were equal. The placement fraction is the same for the announced
spans, as if every load had finished: what placement alone loses, without the loading lag.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from swarm.node.placement import bottleneck, choose_start, should_move, should_move_damped
from swarm.sim.churn import Session, Trace
from swarm.sim.petals import (
    PETALS_BALANCE_PERIOD_MINUTES,
    PETALS_BALANCE_QUALITY,
    PETALS_WHAT_IF_MINUTES,
    petals_should_move,
    settled_bottleneck,
)
from swarm.sim.population import NUM_BLOCKS
from swarm.sim.report import PolicyRun

OUR_BALANCE_PERIOD_MINUTES = 2.0  # --balance-period 120 s, randomized by +-50%
OUR_BALANCE_QUALITY = 0.75  # --balance-quality's default
ZERO = 1e-9  # totals below this are an uncovered block (sums and differences of floats leave dust)


def load_minutes(span_length: int) -> float:
    return 1.0 + 0.15 * span_length


@dataclass
class SimNode:
    session: Session
    start: int  # the span its record announces
    serving: int | None  # the span it serves now; None while loading its first
    loading: int | None = None  # the span it is loading
    ready_at: float = 0.0

    @property
    def length(self) -> int:
        return self.session.hardware.span_length

    @property
    def throughput(self) -> float:
        return self.session.hardware.span_throughput


@dataclass(frozen=True)
class InferencePolicy:
    """How nodes rebalance: `next_check` gives minutes to the next check (None: never), `decide` the start to
    move to (or None); `restart_to_move` for software that stops serving while it moves (Petals)."""

    name: str
    next_check: Callable[[random.Random], float | None]
    decide: Callable[[InferenceSwarm, SimNode], int | None]
    restart_to_move: bool = False


class InferenceSwarm:
    """Per-block totals of announced spans (what nodes plan with) and of served spans (what clients get)."""

    def __init__(self, num_blocks: int, seed: int):
        self.num_blocks = num_blocks
        self.rng = random.Random(seed)
        self.nodes: dict[int, SimNode] = {}
        self.announced = [0.0] * num_blocks
        self.served = [0.0] * num_blocks
        self.capacity = 0.0  # sum of throughput x span length over the nodes online
        self.now = 0.0
        self._settled: tuple[int, float] | None = None  # (minute, Petals' what-if bottleneck)

    def _add(self, totals: list[float], start: int, length: int, amount: float) -> None:
        for block in range(start, start + length):
            value = totals[block] + amount
            totals[block] = value if value > ZERO else 0.0

    def join(self, session: Session, now: float, loaded: bool) -> SimNode:
        hardware = session.hardware
        start = choose_start(self.announced, hardware.span_length, hardware.span_throughput)
        node = SimNode(session, start, None, loading=start, ready_at=now + load_minutes(hardware.span_length))
        self.nodes[session.session_id] = node
        self._add(self.announced, start, node.length, node.throughput)
        self.capacity += node.throughput * node.length
        if loaded:
            self.finish_loading(node)
        return node

    def leave(self, session_id: int) -> None:
        node = self.nodes.pop(session_id)
        self._add(self.announced, node.start, node.length, -node.throughput)
        if node.serving is not None:
            self._add(self.served, node.serving, node.length, -node.throughput)
        self.capacity -= node.throughput * node.length

    def start_move(self, node: SimNode, target: int, now: float, restart: bool) -> None:
        node.loading, node.ready_at = target, now + load_minutes(node.length)
        if restart:  # Petals: stop serving, announce the new span, load it
            self._add(self.served, node.serving, node.length, -node.throughput)
            self._add(self.announced, node.start, node.length, -node.throughput)
            self._add(self.announced, target, node.length, node.throughput)
            node.serving, node.start = None, target

    def finish_loading(self, node: SimNode) -> None:
        target, node.loading = node.loading, None
        if node.serving is not None:  # ours: switch from the old span, record and service together
            self._add(self.served, node.serving, node.length, -node.throughput)
        if node.start != target:
            self._add(self.announced, node.start, node.length, -node.throughput)
            self._add(self.announced, target, node.length, node.throughput)
        self._add(self.served, target, node.length, node.throughput)
        node.start = node.serving = target

    def fraction_of_optimal(self, announced: bool = False) -> float:
        """The served (or announced) spans' bottleneck over the optimal bound."""
        if self.capacity <= 0:
            return 0.0
        totals = self.announced if announced else self.served
        return min(1.0, bottleneck(totals) / (self.capacity / self.num_blocks))

    def without(self, node: SimNode) -> list[float]:
        """The announced totals less this node's own span: what `Server._swarm_throughputs` reads."""
        totals = list(self.announced)
        self._add(totals, node.start, node.length, -node.throughput)
        return totals

    def petals_settled(self) -> float:
        """Petals' what-if bottleneck, recomputed every `PETALS_WHAT_IF_MINUTES` (see `swarm.sim.petals`)."""
        minute = math.floor(self.now)
        if self._settled is None or minute - self._settled[0] >= PETALS_WHAT_IF_MINUTES:
            spans = [(n.start, n.length, n.throughput) for n in self.nodes.values()]
            self._settled = (minute, settled_bottleneck(self.num_blocks, spans, self.rng))
        return self._settled[1]


def run_inference(
    trace: Trace, policy: InferencePolicy, seed: int, num_blocks: int = NUM_BLOCKS
) -> PolicyRun:
    """Step `trace` minute by minute under `policy`; the nodes online at time 0 start loaded."""
    swarm = InferenceSwarm(num_blocks, seed)
    run = PolicyRun(policy.name, trace.name)
    departures = sorted((s.leave, s.session_id) for s in trace.sessions)
    checks: list[tuple[float, int]] = []  # (time, session id); stale entries are skipped
    next_arrival = next_departure = 0

    def schedule_check(node: SimNode, after: float) -> None:
        delay = policy.next_check(swarm.rng)
        if delay is not None:
            heapq.heappush(checks, (after + delay, node.session.session_id))

    for minute in range(trace.minutes):
        end = minute + 1.0
        while next_arrival < len(trace.sessions) and trace.sessions[next_arrival].arrive < end:
            session = trace.sessions[next_arrival]
            next_arrival += 1
            warm = session.arrive == 0.0
            node = swarm.join(session, session.arrive, loaded=warm)
            run.joins += not warm
            if warm:
                schedule_check(node, 0.0)
        while next_departure < len(departures) and departures[next_departure][0] < end:
            session_id = departures[next_departure][1]
            next_departure += 1
            if session_id in swarm.nodes:
                swarm.leave(session_id)
        for node in list(swarm.nodes.values()):
            if node.loading is not None and node.ready_at < end:
                swarm.finish_loading(node)
                schedule_check(node, node.ready_at)
        while checks and checks[0][0] < end:
            swarm.now, session_id = heapq.heappop(checks)
            node = swarm.nodes.get(session_id)
            if node is None or node.loading is not None:
                continue
            target = policy.decide(swarm, node)
            if target is None or target == node.start:
                schedule_check(node, swarm.now)
                continue
            run.reloads += 1
            swarm.start_move(node, target, swarm.now, policy.restart_to_move)
        run.record_minute(
            swarm.fraction_of_optimal(), swarm.fraction_of_optimal(announced=True), len(swarm.nodes)
        )
    return run


def _uniform(low: float, high: float) -> Callable[[random.Random], float]:
    return lambda rng: rng.uniform(low, high)


def _never(rng: random.Random) -> None:
    return None


def _ours(swarm: InferenceSwarm, node: SimNode) -> int | None:
    return should_move(swarm.without(node), node.start, node.length, node.throughput, OUR_BALANCE_QUALITY)


def _damped(swarm: InferenceSwarm, node: SimNode) -> int | None:
    chance = swarm.rng.random()
    return should_move_damped(swarm.without(node), node.start, node.length, node.throughput, chance)


def _petals(swarm: InferenceSwarm, node: SimNode) -> int | None:
    return petals_should_move(
        swarm.announced,
        node.start,
        node.length,
        node.throughput,
        swarm.petals_settled,
        PETALS_BALANCE_QUALITY,
    )


INFERENCE_POLICIES = {
    "no rebalancing": InferencePolicy("no rebalancing", _never, lambda swarm, node: None),
    "Petals": InferencePolicy(
        "Petals", _uniform(0.0, 2 * PETALS_BALANCE_PERIOD_MINUTES), _petals, restart_to_move=True
    ),
    "ours (should_move)": InferencePolicy(
        "ours (should_move)",
        _uniform(0.5 * OUR_BALANCE_PERIOD_MINUTES, 1.5 * OUR_BALANCE_PERIOD_MINUTES),
        _ours,
    ),
    "damped (should_move_damped)": InferencePolicy(
        "damped (should_move_damped)",
        _uniform(0.5 * OUR_BALANCE_PERIOD_MINUTES, 1.5 * OUR_BALANCE_PERIOD_MINUTES),
        _damped,
    ),
}
