"""A client's connection to one model's swarm: DHT, P2P, event loop, view of the swarm, routing, bans.

The Hugging Face-style model, inference sessions and the remote autograd function all share one
SwarmClient; none of them owns the machinery, so a trainer can use it without a model around it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from hivemind.p2p import P2P

from swarm.client.bans import BanList
from swarm.client.config import ClientConfig
from swarm.client.errors import MissingBlocksError, QuantNotAllowedError
from swarm.client.remote import get_info
from swarm.client.routing import (
    RemoteSpan,
    believed,
    min_latency_route,
    quant_of,
    throughput_weighted_route,
    usable_servers,
)
from swarm.dht.factory import create_dht
from swarm.dht.relay import connect_through
from swarm.dht.swarm_view import consensus_hashes, read_swarm
from swarm.proto import swarm_pb2
from swarm.utils.aio import BackgroundLoop

if TYPE_CHECKING:
    from swarm.models.span import LlamaSpan
    from swarm.verification.spot_check import SpotChecker

logger = logging.getLogger(__name__)

MAX_MEASURED_PEERS = 4096  # speeds remembered (oldest forgotten first)

RTT_MAX_AGE = 60.0  # seconds before a node is pinged again
MAX_PINGS = 64  # nodes pinged at once when routing
RTT_FORGET_AFTER = 600.0  # seconds after which an unused node's round-trip time is forgotten
PING_TIMEOUT = 2.0
UNREACHABLE_RTT = 10.0  # what a node that does not answer a ping costs a route
VERDICT_LIFETIME = 7 * 24 * 3600.0  # seconds a published verdict stays in the DHT


class SwarmClient:
    """Joins the swarm as a DHT client and finds routes through the nodes serving `model_name`.

    `local_hashes` returns the block hashes of the caller's own copy of the weights (or None when it
    has no blocks); nodes whose weights differ are never routed through. A participant that others must
    reach (a trainer, which averages and serves its state) passes client_mode=False and where to listen
    (`dht_options`: host, port, announce_maddrs, identity_path).
    """

    def __init__(
        self,
        model_name: str,
        num_blocks: int,
        config: ClientConfig,
        local_hashes: Callable[[], list[str] | None] = lambda: None,
        client_mode: bool = True,
        referee_span: Callable[[int, int], LlamaSpan | None] = lambda start, end: None,
        **dht_options,
    ):
        self.model_name, self.num_blocks, self.config = model_name, num_blocks, config
        self.bans = BanList()
        self.convicted: set[str] = set()  # nodes a dispute proved wrong: never routed through again
        self._local_hashes = local_hashes
        self._expected_hashes: list[str] | None = None
        self._loop = BackgroundLoop()
        self._closed = False
        try:
            self.dht, self.signer = create_dht(config.initial_peers, client_mode=client_mode, **dht_options)
            self.p2p: P2P = self._loop.run(self.dht.replicate_p2p(), timeout=config.dht_timeout)
        except BaseException:
            self._loop.close()
            raise
        self._view = None
        self._view_time = 0.0
        self._rtts: dict[str, tuple[float, float]] = {}  # peer id -> (round trip seconds, when measured)
        self._measured: dict[str, float] = {}  # peer id -> block-tokens per second this client saw (EMA)
        self._rng = random.Random()
        self._quant_filtered: list[swarm_pb2.ServerInfo] = []  # usable but left out by allowed_quant
        # imported here: swarm.verification.remote imports swarm.client (its errors) in turn
        from swarm.verification.spot_check import SpotChecker
        from swarm.verification.verdicts import VerdictBook

        self._referee_span = referee_span
        self.verdicts = VerdictBook(model_name, num_blocks)  # verdicts from the DHT, re-checked here
        self.spot_checker: SpotChecker | None = None
        if config.verify_rate > 0:
            self.spot_checker = SpotChecker(
                self.p2p,
                config.verify_rate,
                referee_span,
                config.request_timeout,
                model=model_name,
                publish=self._publish_verdict,
            )

    def expected_hashes(self, model_infos) -> list[str] | None:
        """Trust the local checkpoint's block hashes when it holds the blocks, else the DHT's consensus."""
        if not self.config.verify_weights:
            return None
        if self._expected_hashes is None:
            self._expected_hashes = self._local_hashes()
        return self._expected_hashes or consensus_hashes(model_infos)

    def usable_servers(self, refresh: bool = False) -> list[swarm_pb2.ServerInfo]:
        """ONLINE nodes with the right weights that are neither banned nor filtered out.

        The view of the swarm is re-read from the DHT every `refresh_period` seconds, or at once on request.
        """
        config = self.config
        stale = time.monotonic() - self._view_time > config.refresh_period
        if refresh or stale or self._view is None:
            self._view = read_swarm(self.dht, self.model_name, self.num_blocks, config.dht_timeout)
            self._view_time = time.monotonic()
            if config.honour_verdicts:
                self._judge_verdicts()
        servers, model_infos = self._view
        excluded = self.bans.active() | self.convicted | self.verdicts.banned()
        usable = usable_servers(servers, self.expected_hashes(model_infos), excluded)
        if config.allowed_servers is not None:
            usable = [s for s in usable if s.peer_id in set(config.allowed_servers)]
        usable = [s for s in usable if s.peer_id not in set(config.blocked_servers)]
        if config.allowed_quant is not None:
            self._quant_filtered = [s for s in usable if quant_of(s) not in config.allowed_quant]
            usable = [s for s in usable if quant_of(s) in config.allowed_quant]
        return believed(usable, self._measured)

    def measured_rates(self) -> dict[str, float]:
        """Peer id -> block-tokens per second this client measured of that node (a moving average)."""
        return dict(self._measured)

    def record_hop(self, peer_id: str, block_tokens: int, seconds: float) -> None:
        """What a call to a node showed of its speed (`block_tokens`: tokens x blocks it ran), which caps
        how fast routing believes it is (routing.believed)."""
        if seconds <= 0 or block_tokens <= 0:
            return
        rate = block_tokens / seconds
        previous = self._measured.get(peer_id)
        self._measured[peer_id] = rate if previous is None else 0.7 * previous + 0.3 * rate
        while len(self._measured) > MAX_MEASURED_PEERS:
            self._measured.pop(next(iter(self._measured)))

    def serves_without(self, peer_id: str, block: int) -> bool:
        """Whether a usable node other than `peer_id` serves `block`."""
        return any(
            s.peer_id != peer_id and s.start_block <= block < s.end_block for s in self.usable_servers()
        )

    def find_route(
        self,
        start: int = 0,
        end: int | None = None,
        mode: str = "inference",
        exclude: frozenset[str] = frozenset(),
        quant: str | None = None,
        wait: bool = True,
    ) -> list[RemoteSpan]:
        """A chain of nodes covering blocks [start, end), none of them in `exclude` (and all of `quant`
        weights, if given); waits a bounded time for missing blocks (unless not `wait`).

        `inference`: the lowest-latency chain (measured RTTs, announced throughput, fewer hops);
        `forward`: a throughput-weighted random chain, which spreads batches over replicas.
        """
        end = self.num_blocks if end is None else end
        deadline = time.monotonic() + self.config.wait_for_blocks
        refresh = False
        while True:
            usable = [s for s in self.usable_servers(refresh=refresh) if s.peer_id not in exclude]
            if quant is not None:
                usable = [s for s in usable if quant_of(s) == quant]
            try:
                if mode == "inference":
                    return min_latency_route(usable, start, end, self.measure_rtts(usable))
                return throughput_weighted_route(usable, start, end, self._rng)
            except MissingBlocksError as e:
                if not wait or time.monotonic() >= deadline:
                    self._explain_quant(e.missing, exclude)
                    raise
                refresh = True  # a block ran out of nodes: look again now, not at the next refresh
                time.sleep(0.5)

    def _explain_quant(self, missing: list[int], exclude: frozenset[str]) -> None:
        """Raise QuantNotAllowedError if nodes left out by allowed_quant would serve all of `missing`."""
        allowed = self.config.allowed_quant
        others = [s for s in self._quant_filtered if s.peer_id not in exclude]
        if allowed is None or not others:
            return
        served = {
            block: sorted({quant_of(s) for s in others if s.start_block <= block < s.end_block})
            for block in missing
        }
        if all(served.values()):
            raise QuantNotAllowedError(missing, served, list(allowed))

    def measure_rtts(self, servers: list[swarm_pb2.ServerInfo]) -> dict[str, float]:
        """Round-trip times to nodes (pinged with rpc_info when unknown or older than a minute)."""
        now = time.monotonic()
        todo = [s.peer_id for s in servers if now - self._rtts.get(s.peer_id, (0.0, -1e9))[1] > RTT_MAX_AGE][
            :MAX_PINGS
        ]
        relayed = {s.peer_id: list(s.relay_maddrs) for s in servers if s.relay_maddrs}
        if todo:

            async def ping(peer_id: str) -> float:
                started = time.perf_counter()
                try:
                    if peer_id in relayed:  # behind NAT: the round trip through its relay is what a hop costs
                        await connect_through(self.p2p, peer_id, relayed[peer_id], PING_TIMEOUT)
                    await get_info(self.p2p, peer_id, PING_TIMEOUT)
                    return time.perf_counter() - started
                except Exception:
                    return UNREACHABLE_RTT

            async def ping_all():
                return await asyncio.gather(*(ping(peer) for peer in todo))

            for peer, rtt in zip(todo, self.run_async(ping_all()), strict=True):
                self._rtts[peer] = (rtt, now)
            # forget nodes not measured for a long while (they left, or routing no longer sees them)
            for peer in [p for p, (_, when) in self._rtts.items() if now - when > RTT_FORGET_AFTER]:
                del self._rtts[peer]
        return {peer: rtt for peer, (rtt, _) in self._rtts.items()}

    def ban(self, peer_id: str) -> None:
        """Stop routing through a node for a while; each repeated failure doubles the wait."""
        self.bans.ban(peer_id)

    def _judge_verdicts(self) -> None:
        """Re-check the model's verdicts in the DHT that this client can (its own blocks, the referee's
        profile): a verdict that holds convicts; a false one bans its author."""
        from swarm.verification.determinism import deterministic_profile, referee_profile
        from swarm.verification.verdicts import judge_verdicts

        def load_block(block: int):
            return self._referee_span(block, block + 1)

        try:
            with deterministic_profile():
                judge_verdicts(
                    self.dht,
                    self.model_name,
                    self.verdicts,
                    load_block,
                    referee_profile(),
                    self.config.dht_timeout,
                )
        except Exception as e:
            logger.debug("judging verdicts: %r", e)

    def _publish_verdict(self, record) -> None:
        """Store a verdict this client's spot checker settled, under its own key, for others to re-check."""
        from swarm.verification.verdicts import publish_verdict

        stored = publish_verdict(
            self.dht,
            self.model_name,
            record,
            VERDICT_LIFETIME,
            owner_public_key=self.signer.local_public_key,
            timeout=self.config.dht_timeout,
        )
        logger.info("published the verdict against %s: %s", list(record.losers), stored)

    def convict(self, peer_ids) -> None:
        """Never route through these nodes again (a dispute proved they computed wrong results)."""
        self.convicted.update(peer_ids)

    def run_async(self, coro, timeout: float | None = None):
        """Run a coroutine on the client's event loop thread and wait for its result."""
        return self._loop.run(coro, timeout=timeout)

    def submit_async(self, coro) -> concurrent.futures.Future:
        """Start a coroutine on the client's event loop thread without waiting for it."""
        return self._loop.submit(coro)

    def close(self) -> None:
        """Leave the swarm: stop the P2P replica, the DHT process and the event loop."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.run(self.p2p.shutdown(), timeout=5)
        except Exception as e:
            logger.debug("p2p shutdown: %r", e)
        self.dht.shutdown()
        self._loop.close()

    def __enter__(self) -> SwarmClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
