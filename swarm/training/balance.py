"""Which stage of a training run a peer serves: newcomers join the weakest stage, and a peer of the
strongest stage moves to the weakest when that raises the pipeline's bottleneck by enough.

Every sample passes every stage, so the pipeline runs at the pace of its stage with the least total
throughput (samples/s, summed over the stage's peers). Pure functions over announced records: the nodes and
the placement simulator (`swarm.sim`) run the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

UNMEASURED_THROUGHPUT = 1e-9  # a peer that has not measured itself yet still counts as present


@dataclass(frozen=True)
class StagePeer:
    """One peer of a stage as its record announces it."""

    peer_id: str
    throughput: float
    queue_length: int = 0


def stage_totals(stages: Sequence[Sequence[StagePeer]]) -> list[float]:
    """Total throughput of each stage (an unmeasured peer counts as a tiny positive throughput)."""
    return [sum(max(p.throughput, UNMEASURED_THROUGHPUT) for p in peers) for peers in stages]


def choose_stage(stages: Sequence[Sequence[StagePeer]]) -> int:
    """The stage a newcomer joins: the least total throughput, then the longest queues, then the fewest
    peers, then the lowest index."""
    if not stages:
        raise ValueError("a run has at least one stage")
    totals = stage_totals(stages)
    return min(
        range(len(stages)),
        key=lambda s: (totals[s], -sum(p.queue_length for p in stages[s]), len(stages[s]), s),
    )


def plan_move(stages: Sequence[Sequence[StagePeer]], me: str, min_gain: float = 0.1) -> int | None:
    """The stage `me` should move to now, or None to stay.

    Only one peer in the whole run is chosen, so that peers deciding on the same records do not all move at
    once: a peer of the stage with the most throughput (that has more than one peer), the one whose move to
    the weakest stage gives the highest bottleneck (ties: the shortest queue, the most spare capacity, then
    the lowest peer id). It moves only when the bottleneck rises by more than `min_gain` (a fraction), so a
    balanced run does not oscillate.
    """
    move = best_move(stages)
    if move is None or move.peer.peer_id != me:
        return None
    return move.target if move.bottleneck_after > move.bottleneck_before * (1.0 + min_gain) else None


def plan_move_paying(stages: Sequence[Sequence[StagePeer]], me: str, min_share: float = 0.5) -> int | None:
    """As `plan_move`, with a threshold that holds at any scale: the chosen peer moves when at least
    `min_share` of its own throughput lands on the bottleneck.

    `plan_move`'s threshold is a fraction of the whole bottleneck, which one peer among a hundred per stage
    can never reach, so a large run rebalances only by its newcomers. Measured against the mover's own
    throughput, a move is made when it pays for its reload, and a balanced run (where a move would only
    swap which stage is weakest) still does not oscillate.
    """
    move = best_move(stages)
    if move is None or move.peer.peer_id != me:
        return None
    gain = move.bottleneck_after - move.bottleneck_before
    return move.target if gain >= min_share * max(move.peer.throughput, UNMEASURED_THROUGHPUT) else None


def with_moves(
    stages: Sequence[Sequence[StagePeer]], moving: Sequence[tuple[int, StagePeer]]
) -> list[list[StagePeer]]:
    """`stages` with each announced move (target stage, peer) counted where the peer is going: a peer that
    is loading another stage before it switches must not look like spare capacity in its old one, or a
    second peer would move for the same gap."""
    movers = {peer.peer_id for _, peer in moving}
    counted = [[p for p in peers if p.peer_id not in movers] for peers in stages]
    for target, peer in moving:
        counted[target].append(peer)
    return counted


def move_pays(stages: Sequence[Sequence[StagePeer]], me: str, target: int, min_gain: float = 0.1) -> bool:
    """Whether moving `me` from its stage to `target` still raises the bottleneck by more than `min_gain`
    (re-checked once the mover has loaded the target's state: others may have moved meanwhile)."""
    source = next((s for s, peers in enumerate(stages) if any(p.peer_id == me for p in peers)), None)
    if source is None or source == target or len(stages[source]) < 2:
        return False
    totals = stage_totals(stages)
    peer = next(p for p in stages[source] if p.peer_id == me)
    return _bottleneck_after(totals, source, target, peer) > min(totals) * (1.0 + min_gain)


@dataclass(frozen=True)
class StageMove:
    peer: StagePeer
    target: int
    bottleneck_before: float
    bottleneck_after: float


def best_move(stages: Sequence[Sequence[StagePeer]]) -> StageMove | None:
    """The one move the run would make now, whatever it gains (see `plan_move`), or None without a donor."""
    if len(stages) < 2:
        return None
    totals = stage_totals(stages)
    target = choose_stage(stages)
    donors = [s for s in range(len(stages)) if s != target and len(stages[s]) > 1]
    if not donors:
        return None
    source = max(donors, key=lambda s: (totals[s], -s))

    def bottleneck_after(peer: StagePeer) -> float:
        return _bottleneck_after(totals, source, target, peer)

    mover = min(
        stages[source], key=lambda p: (-bottleneck_after(p), p.queue_length, -p.throughput, p.peer_id)
    )
    return StageMove(mover, target, min(totals), bottleneck_after(mover))


def _bottleneck_after(totals: Sequence[float], source: int, target: int, peer: StagePeer) -> float:
    """The least stage total once `peer` moved from stage `source` to stage `target`."""
    moved = max(peer.throughput, UNMEASURED_THROUGHPUT)
    after = list(totals)
    after[source] -= moved
    after[target] += moved
    return min(after)
