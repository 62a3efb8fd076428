"""Where a node should serve: the span that raises the swarm's bottleneck (its weakest block's throughput)."""

from __future__ import annotations

from collections.abc import Iterable

from swarm.dht.records import RELAYED_THROUGHPUT_FACTOR
from swarm.proto import swarm_pb2

# JOINING nodes count: they are loading the blocks they announced and will serve them shortly
SERVING_STATES = (swarm_pb2.ServerInfo.JOINING, swarm_pb2.ServerInfo.ONLINE)


def reachable_throughput(info: swarm_pb2.ServerInfo) -> float:
    """The throughput a node gives clients: as announced, discounted behind a relay, 0 if unreachable."""
    if info.unreachable:
        return 0.0
    return info.throughput * (RELAYED_THROUGHPUT_FACTOR if info.using_relay else 1.0)


def planned_span(info: swarm_pb2.ServerInfo) -> tuple[int, int]:
    """Where a node will serve: the span it announced it is moving to, else the one it serves."""
    if info.HasField("moving_to_start"):
        return info.moving_to_start, info.moving_to_start + (info.end_block - info.start_block)
    return info.start_block, info.end_block


def block_throughputs(
    servers: Iterable[swarm_pb2.ServerInfo],
    num_blocks: int,
    exclude: str | None = None,
    moves_yielded_to: str | None = None,
) -> list[float]:
    """Total announced throughput per block, leaving out `exclude` (a node planning its own move).

    A node that announced a move counts where it is going (it is loading that span and will leave its own):
    otherwise a second node would move to fill the same gap. With `moves_yielded_to` (a peer id), only the
    moves of nodes that win a tie against that peer count (lower peer ids): two nodes that announced moves
    at once each re-check after loading, and exactly one of them goes.
    """
    totals = [0.0] * num_blocks
    for info in servers:
        if info.peer_id == exclude or info.state not in SERVING_STATES:
            continue
        start, end = info.start_block, info.end_block
        if moves_yielded_to is None or info.peer_id < moves_yielded_to:
            start, end = planned_span(info)
        for block in range(max(0, start), min(num_blocks, end)):
            # a node that serves counts, even if unmeasured; relayed ones less, so that direct nodes go to
            # the spans that only relayed nodes hold (the busiest, per unit of throughput)
            totals[block] += max(reachable_throughput(info), 1e-9)
    return totals


def bottleneck(throughputs: list[float]) -> float:
    return min(throughputs) if throughputs else 0.0


def with_span(throughputs: list[float], start: int, length: int, throughput: float) -> list[float]:
    added = list(throughputs)
    for block in range(start, start + length):
        added[block] += throughput
    return added


def choose_start(throughputs: list[float], length: int, throughput: float) -> int:
    """The start that maximizes the resulting bottleneck.

    Ties go to the span covering the most uncovered blocks, then to the weakest window (its sorted
    throughputs compared lexicographically, as Petals does), then to the lowest start.
    """
    num_blocks = len(throughputs)
    if not 0 < length <= num_blocks:
        raise ValueError(f"cannot place {length} blocks in a model of {num_blocks}")

    def score(start: int):
        window = throughputs[start : start + length]
        return (
            -bottleneck(with_span(throughputs, start, length, throughput)),
            -sum(1 for t in window if t <= 0),
            sorted(window),
            start,
        )

    return min(range(num_blocks - length + 1), key=score)


def should_move(
    throughputs_without_me: list[float],
    current_start: int,
    length: int,
    throughput: float,
    balance_quality: float,
) -> int | None:
    """The start to move to, or None to stay.

    Move at once when some block has no node even counting this one; otherwise move only when the
    current bottleneck is below `balance_quality` times the bottleneck after moving.
    """
    if balance_quality <= 0:
        return None
    current = with_span(throughputs_without_me, current_start, length, throughput)
    best_start = choose_start(throughputs_without_me, length, throughput)
    if best_start == current_start:
        return None
    best = with_span(throughputs_without_me, best_start, length, throughput)
    if bottleneck(current) <= 0 < bottleneck(best) or (
        bottleneck(current) <= 0 and sum(t <= 0 for t in best) < sum(t <= 0 for t in current)
    ):
        return best_start
    if bottleneck(best) > 0 and bottleneck(current) / bottleneck(best) < balance_quality:
        return best_start
    return None


def should_move_damped(
    throughputs_without_me: list[float],
    current_start: int,
    length: int,
    throughput: float,
    chance: float,
    min_gain: float = 1.0,
    damping: float = 0.2,
) -> int | None:
    """The start to move to, or None to stay: a rule that still works with a thousand nodes.

    `should_move` compares the swarm's bottleneck before and after, which one node among hundreds per block
    can never change by 25%, so at scale it moves only to cover a block nobody serves. Here a move is
    judged by what it does with this node's own throughput: worth it when the bottleneck rises by at least
    `min_gain` of it (all of it, by default). Every node reads the same records and sees the same weak
    blocks, so to keep them from all moving there at once (and leaving holes behind), each one whose move is
    worth it goes with
    probability `damping` x (throughput missing below the blocks' mean) / (all throughput), so that about
    `damping` of the gap is filled per balance period (a move shows in the records only once loaded, minutes
    later, hence a small damping); `chance` is the node's uniform draw in [0, 1).
    A block left with no node is covered at once, as in `should_move`.
    """
    best_start = choose_start(throughputs_without_me, length, throughput)
    if best_start == current_start:
        return None
    current = with_span(throughputs_without_me, current_start, length, throughput)
    best = with_span(throughputs_without_me, best_start, length, throughput)
    uncovered_now, uncovered_after = sum(t <= 0 for t in current), sum(t <= 0 for t in best)
    if uncovered_after < uncovered_now:
        return best_start
    if bottleneck(best) - bottleneck(current) < min_gain * throughput:
        return None
    total = sum(current)
    mean = total / len(current)
    missing = sum(mean - t for t in current if t < mean)
    return best_start if chance < damping * missing / total else None
