"""Training stage placement, stepped one minute at a time: peers join the weakest stage with `choose_stage`
and re-check by their policy while they train.

The model's 80 blocks form `NUM_STAGES` stages of 10 (what the smallest GPU class holds); a peer's throughput
is its per-block speed (`swarm.sim.population`). Joining or moving takes `LOAD_MINUTES` (the stage's blocks
plus parameters and optimizer state from a peer of the stage). A newcomer is announced in its stage at once
and trains there once loaded; a moving peer of ours keeps training its old stage meanwhile and switches when
loaded (`swarm.training.node`), while under SWARM's rule it leaves its stage at once.

The fraction of optimal each minute is the weakest stage's total over sum(throughput) / stages of every peer
online: a bound that an equal split would reach (the placement fraction: the same for the announced stages,
as if every load had finished).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from swarm.sim.churn import Session, Trace
from swarm.sim.report import PolicyRun
from swarm.training.balance import StageMove, StagePeer, best_move, choose_stage, plan_move, plan_move_paying

NUM_STAGES = 8
LOAD_MINUTES = 5.0
OUR_BALANCE_PERIOD_MINUTES = 2.0  # --balance-period 120 s, randomized by +-50% (swarm.training.node)
OUR_MIN_GAIN = 1.0 / 0.75 - 1.0  # what the training node passes plan_move for --balance-quality 0.75
SWARM_PERIOD_MINUTES = 5.0  # the SWARM paper's T = 300 s


@dataclass
class SimPeer:
    session: Session
    record: StagePeer
    stage: int
    training: bool  # False while loading its first stage
    ready_at: float
    moving_to: int | None = None  # the stage it is loading while it still trains in `stage`


class TrainingRun:
    """Announced stages (what peers plan with) and the throughput of each stage's loaded peers."""

    def __init__(self, num_stages: int, seed: int):
        self.rng = random.Random(seed)
        self.peers: dict[int, SimPeer] = {}
        self.announced: list[dict[str, StagePeer]] = [{} for _ in range(num_stages)]
        self.trained = [0.0] * num_stages
        self.capacity = 0.0
        self._snapshot: list[list[StagePeer]] | None = None
        self._best_move: tuple[StageMove | None] | None = None

    def stages(self) -> list[list[StagePeer]]:
        """The announced stages, as a peer reads them (rebuilt only after a change)."""
        if self._snapshot is None:
            self._snapshot = [list(stage.values()) for stage in self.announced]
            self._best_move = None
        return self._snapshot

    def may_move(self, me: str) -> bool:
        """Whether `me` is the one peer `best_move` picks on these records: the rules answer None for every
        other peer, so the run asks them only for this one (hundreds of peers check between two changes)."""
        stages = self.stages()
        if self._best_move is None:
            self._best_move = (best_move(stages),)
        move = self._best_move[0]
        return move is not None and move.peer.peer_id == me

    def _announce(self, peer: SimPeer, stage: int) -> None:
        self.announced[peer.stage].pop(peer.record.peer_id, None)
        self.announced[stage][peer.record.peer_id] = peer.record
        peer.stage = stage
        self._snapshot = None

    def join(self, session: Session, now: float, loaded: bool) -> SimPeer:
        stage = choose_stage(self.stages())
        record = StagePeer(f"peer{session.session_id}", session.hardware.block_speed)
        peer = SimPeer(session, record, stage, training=False, ready_at=now + LOAD_MINUTES)
        self.peers[session.session_id] = peer
        self._announce(peer, stage)
        self.capacity += record.throughput
        if loaded:
            self.finish_loading(peer)
        return peer

    def leave(self, session_id: int) -> None:
        peer = self.peers.pop(session_id)
        self.announced[peer.stage].pop(peer.record.peer_id)
        self._snapshot = None
        if peer.training:
            self.trained[peer.stage] -= peer.record.throughput
        self.capacity -= peer.record.throughput

    def move(self, peer: SimPeer, stage: int, now: float, restart: bool) -> None:
        peer.ready_at = now + LOAD_MINUTES
        if not restart:  # ours: keep training the old stage while loading the new one
            peer.moving_to = stage
            return
        if peer.training:
            self.trained[peer.stage] -= peer.record.throughput
        peer.training = False
        self._announce(peer, stage)

    def loading(self, peer: SimPeer) -> bool:
        return not peer.training or peer.moving_to is not None

    def finish_loading(self, peer: SimPeer) -> None:
        if peer.moving_to is not None:  # switch stage, record and service together
            self.trained[peer.stage] -= peer.record.throughput
            self._announce(peer, peer.moving_to)
            peer.moving_to = None
        peer.training = True
        self.trained[peer.stage] += peer.record.throughput

    def fraction_of_optimal(self, announced: bool = False) -> float:
        """The weakest stage's throughput, trained (or announced), over the optimal bound."""
        if self.capacity <= 0:
            return 0.0
        totals = [sum(p.throughput for p in stage) for stage in self.stages()] if announced else self.trained
        return min(1.0, max(0.0, min(totals)) / (self.capacity / len(self.trained)))


@dataclass(frozen=True)
class TrainingPolicy:
    """`next_check` gives each peer's minutes to its next check (None: peers never check), `decide` the stage
    to move to; `global_period` instead runs `swarm_paper_move` once per period for the whole run (SWARM's
    rule). Our peers keep training their stage while they load the next (`swarm.training.node`); with
    `restart_to_move` a peer leaves its stage first."""

    name: str
    next_check: Callable[[random.Random], float | None] = lambda rng: None
    decide: Callable[[Sequence[Sequence[StagePeer]], str], int | None] = lambda stages, me: None
    global_period: float | None = None
    restart_to_move: bool = False


def swarm_paper_move(stages: Sequence[Sequence[StagePeer]]) -> tuple[str, int] | None:
    """SWARM's rule (every T, the most under-used peer moves to the most loaded stage), judged here by
    throughput since the simulator has no queues: the peer of the strongest stage whose move to the weakest
    gives the highest bottleneck, whenever that bottleneck is higher at all."""
    totals = [sum(p.throughput for p in stage) for stage in stages]
    target = min(range(len(stages)), key=totals.__getitem__)
    donors = [s for s in range(len(stages)) if s != target and len(stages[s]) > 1]
    if not donors:
        return None
    source = max(donors, key=totals.__getitem__)

    def bottleneck_after(peer: StagePeer) -> float:
        after = list(totals)
        after[source] -= peer.throughput
        after[target] += peer.throughput
        return min(after)

    mover = max(stages[source], key=bottleneck_after)
    return (mover.peer_id, target) if bottleneck_after(mover) > min(totals) else None


def run_training(trace: Trace, policy: TrainingPolicy, seed: int, num_stages: int = NUM_STAGES) -> PolicyRun:
    """Step `trace` minute by minute under `policy`; the peers online at time 0 start loaded."""
    training = TrainingRun(num_stages, seed)
    run = PolicyRun(policy.name, trace.name)
    departures = sorted((s.leave, s.session_id) for s in trace.sessions)
    by_record = {}
    checks: list[tuple[float, int]] = []
    next_arrival = next_departure = 0
    next_global = policy.global_period

    def schedule_check(peer: SimPeer, after: float) -> None:
        delay = policy.next_check(training.rng)
        if delay is not None:
            heapq.heappush(checks, (after + delay, peer.session.session_id))

    for minute in range(trace.minutes):
        end = minute + 1.0
        while next_arrival < len(trace.sessions) and trace.sessions[next_arrival].arrive < end:
            session = trace.sessions[next_arrival]
            next_arrival += 1
            warm = session.arrive == 0.0
            peer = training.join(session, session.arrive, loaded=warm)
            by_record[peer.record.peer_id] = session.session_id
            run.joins += not warm
            if warm:
                schedule_check(peer, 0.0)
        while next_departure < len(departures) and departures[next_departure][0] < end:
            session_id = departures[next_departure][1]
            next_departure += 1
            if session_id in training.peers:
                training.leave(session_id)
        for peer in list(training.peers.values()):
            if training.loading(peer) and peer.ready_at < end:
                training.finish_loading(peer)
                schedule_check(peer, peer.ready_at)
        while checks and checks[0][0] < end:
            now, session_id = heapq.heappop(checks)
            peer = training.peers.get(session_id)
            if peer is None or training.loading(peer):
                continue
            me = peer.record.peer_id
            target = policy.decide(training.stages(), me) if training.may_move(me) else None
            if target is None or target == peer.stage:
                schedule_check(peer, now)
                continue
            run.reloads += 1
            training.move(peer, target, now, policy.restart_to_move)
        if next_global is not None and next_global < end:
            next_global += policy.global_period
            planned = swarm_paper_move(training.stages())
            mover = training.peers.get(by_record[planned[0]]) if planned is not None else None
            if mover is not None and not training.loading(mover):
                run.reloads += 1
                training.move(mover, planned[1], float(minute), policy.restart_to_move)
        run.record_minute(
            training.fraction_of_optimal(), training.fraction_of_optimal(announced=True), len(training.peers)
        )
    return run


def _every(period: float) -> Callable[[random.Random], float]:
    return lambda rng: period * rng.uniform(0.5, 1.5)


TRAINING_POLICIES = {
    "no rebalancing": TrainingPolicy("no rebalancing"),
    "SWARM paper": TrainingPolicy("SWARM paper", global_period=SWARM_PERIOD_MINUTES, restart_to_move=True),
    "ours (plan_move)": TrainingPolicy(
        "ours (plan_move)",
        _every(OUR_BALANCE_PERIOD_MINUTES),
        lambda stages, me: plan_move(stages, me, OUR_MIN_GAIN),
    ),
    "paying (plan_move_paying)": TrainingPolicy(
        "paying (plan_move_paying)", _every(OUR_BALANCE_PERIOD_MINUTES), plan_move_paying
    ),
}
