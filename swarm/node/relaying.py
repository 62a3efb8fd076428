"""How clients reach a node: directly, through circuit relays (behind NAT), or not at all.

Before its DHT starts the node asks a bootstrap peer to dial it back (swarm.dht.reachability.
probe_reachability; unreachable, it runs its DHT as a client). Reachable, or nobody answered: it is
announced as today. Unreachable: with relays on, it reserves a slot on up to MAX_RELAYS of its initial
peers that say they relay (`swarm dht`, whose --relay-service is on by default) and announces
`using_relay` and the circuit addresses; with relays off, or no relay granting a slot, it announces
`unreachable` and clients never route to it. Slots are renewed every `renew_period`, which also brings
back a relay that restarted and drops one that died.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from hivemind.p2p import P2P

from swarm.dht.reachability import offers_relay
from swarm.dht.relay import RelayRefused, reserve
from swarm.proto import swarm_pb2

logger = logging.getLogger(__name__)

MAX_RELAYS = 2  # as libp2p's autorelay: a second slot keeps the node reachable while one relay is gone
RENEW_PERIOD = 60.0  # seconds; relays grant an hour


class NodeReachability:
    """The node's reachability as announced in its ServerInfo (`describe`)."""

    def __init__(
        self,
        p2p: P2P,
        initial_peers: Sequence[str],
        reachable: bool | None,
        use_relay: bool = True,
        renew_period: float = RENEW_PERIOD,
    ):
        self.p2p, self.initial_peers, self.use_relay = p2p, list(initial_peers), use_relay
        self.renew_period = renew_period
        self.reachable = reachable  # from probe_reachability; None: nobody could tell
        self.circuit_maddrs: list[str] = []

    async def start(self) -> None:
        """If others can't dial us (and relays are on), reserve relay slots."""
        if self.reachable is not False:
            return
        if not self.use_relay:
            logger.warning(
                "this node is not reachable from outside and relays are off (--no-use-relay): clients "
                "will not route to it; forward a port (--announce-maddrs) or turn relays on"
            )
            return
        await self.renew()
        if not self.circuit_maddrs:
            logger.warning("this node is not reachable from outside and no relay granted it a slot")

    async def renew(self) -> None:
        """Reserve (or renew) a slot on each relay; keep the circuit addresses of those that granted one."""
        granted = []
        for relay in self.initial_peers:
            if len(granted) == MAX_RELAYS:
                break
            if not await offers_relay(self.p2p, relay):
                continue
            try:
                granted.append((await reserve(self.p2p, relay)).circuit_maddr)
            except (RelayRefused, ValueError) as e:
                logger.info("relay slot not granted: %s", e)
        if granted != self.circuit_maddrs:
            logger.info("reachable through relays: %s", " ".join(granted) or "none")
        self.circuit_maddrs = granted

    async def keep_renewing(self) -> None:
        """Renew the relay slots every renew_period, for as long as the node runs (a task)."""
        if self.reachable is not False or not self.use_relay:
            return
        while True:
            await asyncio.sleep(self.renew_period)
            try:
                await self.renew()
            except Exception as e:  # a daemon hiccup must not end the loop
                logger.warning("renewing relay slots failed: %r", e)

    def describe(self, info: swarm_pb2.ServerInfo) -> swarm_pb2.ServerInfo:
        """`info` with how to reach this node filled in."""
        info.using_relay = bool(self.circuit_maddrs)
        info.relay_maddrs[:] = self.circuit_maddrs
        info.unreachable = self.reachable is False and not self.circuit_maddrs
        return info
