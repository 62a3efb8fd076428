"""Circuit relays (libp2p circuit relay v2) for peers behind NAT: reserve a slot, dial through one.

Why by hand: hivemind's daemon (p2pd) has autorelay, but its relay finder waits 3 minutes after start
before it reserves anything unless it found 4 candidates (go-libp2p's bootDelay and minCandidates, which
p2pd does not expose), and it announces no /p2p-circuit address through a relay whose addresses are
private (10.x, 192.168.x: a LAN swarm, the test harness). So a node that learned it is unreachable
(swarm.dht.reachability) reserves a slot on its bootstrap peers itself, over the daemon's raw stream API,
and announces the circuit addresses in its ServerInfo; a client dials them with `connect_through`. The
daemon's own circuit transport (on whenever `use_relay` is, hivemind's default) accepts the relayed
connections and speaks the stop side of the protocol.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import read_pbmsg_safe, write_pbmsg
from hivemind.utils.multiaddr import Multiaddr

from swarm.dht.relay_limits import NO_RELAY_SERVICE, RelayLimits
from swarm.proto import circuit_relay_pb2 as relay_pb2
from swarm.utils.varint import encode_varint

__all__ = ["NO_RELAY_SERVICE", "RelayLimits", "RelayRefused", "Reservation", "connect_through", "reserve"]

logger = logging.getLogger(__name__)

HOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/hop"
_P2P_CODE, _CIRCUIT_CODE = 0x01A5, 0x0122  # multiaddr protocol codes of /p2p and /p2p-circuit
RESERVE_TIMEOUT = 10.0


class RelayRefused(RuntimeError):
    """A relay did not grant a reservation (its status, or the stream failed)."""


@dataclass(frozen=True)
class Reservation:
    relay: str  # the relay's multiaddr, ending with /p2p/<its peer id>
    expire: float  # Unix time

    @property
    def circuit_maddr(self) -> str:
        """Where others dial the reserving peer: the relay's address with /p2p-circuit."""
        return f"{self.relay}/p2p-circuit"


def relay_peer_id(maddr: str) -> PeerID:
    """The peer id at the end of a relay's multiaddr; ValueError if it has none."""
    head, sep, peer = str(maddr).rpartition("/p2p/")
    if not sep or not head or not peer or "/" in peer:
        raise ValueError(f"a relay address must end with /p2p/<peer id>, got {maddr!r}")
    return PeerID.from_base58(peer)


async def reserve(p2p: P2P, relay_maddr: str, timeout: float = RESERVE_TIMEOUT) -> Reservation:
    """Reserve a slot for this peer on the relay at `relay_maddr` (already connected or dialable).

    The slot lasts until the reservation's expiry (the relay's default is an hour) while this peer stays
    connected to the relay; renew it before then by calling again."""
    relay = relay_peer_id(relay_maddr)
    try:
        return await asyncio.wait_for(_reserve(p2p, relay, str(relay_maddr)), timeout)
    except RelayRefused:
        raise
    except Exception as e:  # no connection, no hop protocol (relay service off), a timeout
        raise RelayRefused(f"relay {relay_maddr}: {type(e).__name__}: {e}") from e


async def _reserve(p2p: P2P, relay: PeerID, relay_maddr: str) -> Reservation:
    _, reader, writer = await p2p._client.stream_open(relay, [HOP_PROTOCOL])
    try:
        await write_pbmsg(writer, relay_pb2.HopMessage(type=relay_pb2.HopMessage.RESERVE))
        reply = relay_pb2.HopMessage()
        await read_pbmsg_safe(reader, reply)
    finally:
        writer.close()
    if reply.type != relay_pb2.HopMessage.STATUS or reply.status != relay_pb2.OK:
        raise RelayRefused(
            f"relay {relay_maddr} refused the reservation: {relay_pb2.Status.Name(reply.status)}"
        )
    expire = reply.reservation.expire if reply.HasField("reservation") else 0
    return Reservation(relay_maddr, float(expire) if expire else time.time() + 3600.0)


class _RawMaddr(bytes):
    """A multiaddr already in binary form, for the daemon's connect call (which asks for .to_bytes())."""

    def to_bytes(self) -> bytes:
        return bytes(self)


def circuit_maddr_bytes(circuit_maddr: str) -> bytes:
    """A /.../p2p/<relay>/p2p-circuit address in the binary form go-libp2p reads.

    hivemind's Multiaddr writes /p2p/<id> as a CID, which the daemon rejects ("length greater than
    remaining number of bytes in buffer"); go-multiaddr wants the bare multihash there."""
    head, sep, _ = str(circuit_maddr).rpartition("/p2p-circuit")
    if not sep:
        raise ValueError(f"not a circuit address: {circuit_maddr!r}")
    transport, _, _ = head.rpartition("/p2p/")
    relay = relay_peer_id(head).to_bytes()
    return (
        Multiaddr(transport).to_bytes()
        + encode_varint(_P2P_CODE)
        + encode_varint(len(relay))
        + relay
        + encode_varint(_CIRCUIT_CODE)
    )


async def connect_through(p2p: P2P, peer_id: str, circuit_maddrs: Sequence[str], timeout: float) -> None:
    """Open (or keep) a connection to `peer_id` through its relays, so that calls to it can go out;
    a no-op when already connected. Raises the daemon's error when no relay gets through."""
    addrs = [_RawMaddr(circuit_maddr_bytes(m)) for m in circuit_maddrs]
    await asyncio.wait_for(p2p._client.connect(PeerID.from_base58(peer_id), addrs), timeout)
