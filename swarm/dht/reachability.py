"""Is this peer reachable from outside? A dial-back by a bootstrap peer says.

A starting node asks its initial peers, one by one, to open a TCP connection to the ports it listens on.
The asked peer dials only the address the node's connection came from (what its NAT shows, if it sits
behind one), as libp2p's AutoNAT does, so nobody can aim it at a third party. libp2p's own AutoNAT is
no use here: it never dials private addresses (10.x, 192.168.x), so on a LAN swarm or in the test
harness it stays "unknown" forever. A TCP handshake is the whole test: whoever can open one can speak
libp2p to the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from hivemind.p2p import P2P, P2PContext, PeerID

from swarm.proto import reachability_pb2
from swarm.protocol.reachability import ReachabilityProtocol

logger = logging.getLogger(__name__)

DIAL_TIMEOUT = 3.0  # seconds per port: a NAT drops the SYN, so an unreachable port only ever times out
MAX_PORTS = 4  # one request makes the asked peer dial at most this many connections


class DialBackServicer(ReachabilityProtocol):
    """Answers dial-back requests (run by bootstrap peers; any peer may)."""

    def __init__(self, p2p: P2P, relay_service: bool = False, dial_timeout: float = DIAL_TIMEOUT):
        self.p2p, self.relay_service, self.dial_timeout = p2p, relay_service, dial_timeout

    async def rpc_dial_back(
        self, request: reachability_pb2.DialBackRequest, context: P2PContext
    ) -> reachability_pb2.DialBackReply:
        host = await observed_host(self.p2p, context.remote_id)
        ports = [port for port in request.ports if 0 < port < 65536][:MAX_PORTS]
        reply = reachability_pb2.DialBackReply(observed_host=host or "", relay_service=self.relay_service)
        if host is not None and ports:
            reply.reachable = any(await asyncio.gather(*(self._dial(host, port) for port in ports)))
        return reply

    async def _dial(self, host: str, port: int) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.dial_timeout)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True


async def observed_host(p2p: P2P, peer: PeerID) -> str | None:
    """The IPv4/IPv6 address `peer`'s connection to us comes from (not through a relay), if connected."""
    for info in await p2p.list_peers():
        if info.peer_id != peer:
            continue
        for addr in info.addrs:
            text = str(addr)
            if "/p2p-circuit" in text:
                continue
            parts = text.split("/")
            if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
                return parts[2]
    return None


def listening_ports(maddrs: Sequence[object]) -> list[int]:
    """The TCP ports among a peer's own multiaddrs (what it asks to be dialed on)."""
    ports = []
    for maddr in maddrs:
        parts = str(maddr).split("/")
        if "tcp" in parts and "p2p-circuit" not in parts:
            port = int(parts[parts.index("tcp") + 1])
            if port not in ports:
                ports.append(port)
    return ports[:MAX_PORTS]


async def check_reachability(
    p2p: P2P, initial_peers: Sequence[str], ports: Sequence[int], timeout: float = 2 * DIAL_TIMEOUT + 2
) -> bool | None:
    """Whether a peer among `initial_peers` could dial this one back on `ports`: True or False from the
    first that answers, None when none does (no initial peers, or none runs the check)."""
    asked = []
    for maddr in initial_peers:
        peer = str(maddr).rpartition("/p2p/")[2]
        if not peer or peer in asked:
            continue
        asked.append(peer)
        stub = ReachabilityProtocol.stub(p2p, peer)
        try:
            reply = await stub.rpc_dial_back(
                reachability_pb2.DialBackRequest(ports=list(ports)), timeout=timeout
            )
        except Exception as e:
            logger.info("reachability: %s did not answer (%s)", maddr, e)
            continue
        logger.info(
            "reachability: %s dialed us back at %s:%s: %s",
            peer,
            reply.observed_host,
            list(ports),
            "reachable" if reply.reachable else "unreachable",
        )
        return reply.reachable
    return None


async def offers_relay(p2p: P2P, maddr: str, timeout: float = 5.0) -> bool:
    """Whether the peer at `maddr` says it relays for peers behind NAT (asked with an empty dial-back).

    Asked rather than tried: hivemind's bundled p2pd grants a reservation whatever its flags say
    (-relayService=0 and even -relay=0), so whether a peer relays is the operator's word, not the daemon's."""
    peer = str(maddr).rpartition("/p2p/")[2]
    try:
        stub = ReachabilityProtocol.stub(p2p, peer)
        reply = await stub.rpc_dial_back(reachability_pb2.DialBackRequest(), timeout=timeout)
    except Exception as e:
        logger.info("relay: %s did not answer (%s)", maddr, e)
        return False
    return reply.relay_service


def is_loopback(host: str) -> bool:
    """A 127.x listener: a swarm on one machine, where everyone can dial everyone."""
    return host.startswith("127.") or host == "localhost"


async def probe_reachability(initial_peers: Sequence[str], host: str, port: int) -> bool | None:
    """Whether others can dial a peer listening on host:port, learned before that peer starts its DHT (a
    peer nobody can dial must run its DHT as a client, or every lookup through it waits for a timeout).

    A throwaway daemon listens on host:port (any port for 0: a NAT drops them all alike) and asks a
    bootstrap peer to dial it back. None without initial peers, on loopback (trivially reachable), or when
    no initial peer answers."""
    from swarm.access import load_keyring, register_membership

    if not initial_peers or is_loopback(host):
        return None
    p2p = await P2P.create(
        initial_peers=list(initial_peers), host_maddrs=[f"/ip4/{host}/tcp/{port}"], dht_mode="client"
    )
    try:
        register_membership(p2p.peer_id.to_base58(), load_keyring(None))  # a private swarm's bootstrap asks
        return await check_reachability(p2p, initial_peers, listening_ports(await p2p.get_visible_maddrs()))
    finally:
        register_membership(p2p.peer_id.to_base58(), None)
        await p2p.shutdown()
