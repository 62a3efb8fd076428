"""Routes over the swarm: min-latency chains for inference, throughput-weighted chains for batches."""

from __future__ import annotations

import heapq
import logging
import math
import random
from dataclasses import dataclass

from swarm.client.errors import MissingBlocksError
from swarm.dht.records import RELAYED_THROUGHPUT_FACTOR
from swarm.proto import swarm_pb2

logger = logging.getLogger(__name__)

DEFAULT_RTT = 0.05  # seconds assumed for a node not pinged yet: a typical internet round trip
HOP_PENALTY = 0.002  # seconds added per hop so that, all else equal, fewer hops win


@dataclass(frozen=True)
class RemoteSpan:
    """A node and the part of its span a route uses."""

    peer_id: str
    start: int
    end: int
    info: swarm_pb2.ServerInfo

    def __repr__(self) -> str:
        return f"RemoteSpan({self.peer_id[-8:]}, [{self.start}, {self.end}))"


def usable_servers(
    servers: dict[str, swarm_pb2.ServerInfo],
    expected_hashes: list[str] | None,
    banned: set[str] = frozenset(),
) -> list[swarm_pb2.ServerInfo]:
    """ONLINE servers that are not banned and whose weights hash to the model's."""
    usable = []
    for info in servers.values():
        if info.state != swarm_pb2.ServerInfo.ONLINE or info.peer_id in banned:
            continue
        if info.unreachable:  # behind NAT without a relay: a dial would only time out
            continue
        if (
            expected_hashes is not None
            and list(info.block_hashes) != expected_hashes[info.start_block : info.end_block]
        ):
            logger.warning("skipping node %s: its weights differ from the model's", info.peer_id)
            continue
        usable.append(info)
    return usable


def quant_of(info: swarm_pb2.ServerInfo) -> str:
    """The node's --quant ("none" for nodes from before quantization, which announce nothing)."""
    return info.quant or "none"


def missing_blocks(servers: list[swarm_pb2.ServerInfo], start: int, end: int) -> list[int]:
    covered = set()
    for info in servers:
        covered.update(range(max(start, info.start_block), min(end, info.end_block)))
    return [b for b in range(start, end) if b not in covered]


# a node is believed at most this many times faster than the median node announces, or than the client
# measured it: one node announcing 1e300 tokens/s must not draw all traffic
MAX_OVER_MEDIAN = 10.0
MAX_OVER_MEASURED = 10.0


def block_rate(info: swarm_pb2.ServerInfo) -> float:
    """Block-tokens per second a node announces (its throughput through its whole span); 0 if not finite."""
    rate = info.throughput * max(1, info.end_block - info.start_block)
    return rate if math.isfinite(rate) and rate > 0 else 0.0


def believed(
    servers: list[swarm_pb2.ServerInfo], measured: dict[str, float] | None = None
) -> list[swarm_pb2.ServerInfo]:
    """The servers with the throughput the client believes: what each announces, capped at MAX_OVER_MEDIAN
    times the median announcement and at MAX_OVER_MEASURED times what the client measured of it
    (`measured`: peer id -> block-tokens per second). Copies where the cap applies; others unchanged."""
    rates = sorted(block_rate(s) for s in servers)
    if not rates:
        return servers
    median = rates[len(rates) // 2]
    result = []
    for info in servers:
        cap = MAX_OVER_MEDIAN * median if median > 0 else math.inf
        if measured and info.peer_id in measured:
            cap = min(cap, MAX_OVER_MEASURED * measured[info.peer_id])
        rate = block_rate(info)
        if rate <= cap and rate > 0 or info.throughput == 0:
            result.append(info)
            continue
        capped = swarm_pb2.ServerInfo()
        capped.CopyFrom(info)
        capped.throughput = (min(rate, cap) if rate > 0 else 0.0) / max(1, info.end_block - info.start_block)
        result.append(capped)
    return result


def step_time(info: swarm_pb2.ServerInfo, blocks: int) -> float:
    """Seconds one token takes through `blocks` of this node's span, from its announced throughput."""
    span = max(1, info.end_block - info.start_block)
    throughput = info.throughput * (RELAYED_THROUGHPUT_FACTOR if info.using_relay else 1.0)
    return (blocks / span) / max(throughput, 1e-6)


def min_latency_route(
    servers: list[swarm_pb2.ServerInfo], start: int, end: int, rtts: dict[str, float] | None = None
) -> list[RemoteSpan]:
    """Shortest path over block boundaries: each hop costs its node's RTT, compute time and a hop penalty.

    A node may serve any contiguous part of its span, so a route can enter a node mid-span.
    """
    missing = missing_blocks(servers, start, end)
    if missing:
        raise MissingBlocksError(missing)
    rtts = rtts or {}
    best = {start: 0.0}
    previous: dict[int, tuple[int, swarm_pb2.ServerInfo]] = {}
    queue = [(0.0, start)]
    while queue:
        cost, block = heapq.heappop(queue)
        if block == end:
            break
        if cost > best.get(block, float("inf")):
            continue
        for info in servers:
            if not info.start_block <= block < info.end_block:
                continue
            # a relayed node not pinged yet is two links away: the client's to the relay, the relay's to it
            rtt = rtts.get(info.peer_id, DEFAULT_RTT * (2 if info.using_relay else 1))
            hop_base = cost + rtt + HOP_PENALTY
            for stop in range(block + 1, min(info.end_block, end) + 1):
                new_cost = hop_base + step_time(info, stop - block)
                if new_cost < best.get(stop, float("inf")):
                    best[stop] = new_cost
                    previous[stop] = (block, info)
                    heapq.heappush(queue, (new_cost, stop))
    route, block = [], end
    while block != start:
        prev, info = previous[block]
        route.append(RemoteSpan(info.peer_id, prev, block, info))
        block = prev
    return route[::-1]


def throughput_weighted_route(
    servers: list[swarm_pb2.ServerInfo], start: int, end: int, rng: random.Random | None = None
) -> list[RemoteSpan]:
    """For batches: at each block pick among the nodes serving it with odds proportional to throughput,
    and use that node to the end of its span. Spreads load across replicas instead of piling on one."""
    missing = missing_blocks(servers, start, end)
    if missing:
        raise MissingBlocksError(missing)
    rng = rng or random.Random()
    route, block = [], start
    while block < end:
        covering = [s for s in servers if s.start_block <= block < s.end_block]
        factors = [RELAYED_THROUGHPUT_FACTOR if s.using_relay else 1.0 for s in covering]
        weights = [max(s.throughput * f, 1e-6) for s, f in zip(covering, factors, strict=True)]
        info = rng.choices(covering, weights=weights)[0]
        stop = min(info.end_block, end)
        route.append(RemoteSpan(info.peer_id, block, stop, info))
        block = stop
    return route
