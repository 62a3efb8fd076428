"""The RPC of the reachability check: a peer asks a bootstrap peer to dial it back."""

from __future__ import annotations

from hivemind.p2p import P2PContext

from swarm.proto import reachability_pb2
from swarm.protocol.base import Protocol


class ReachabilityProtocol(Protocol):
    """rpc_dial_back: try to open TCP connections to the caller's ports on the address its connection
    comes from; say whether one opened."""

    SERVICE_NAME = "Reachability"

    async def rpc_dial_back(
        self, request: reachability_pb2.DialBackRequest, context: P2PContext
    ) -> reachability_pb2.DialBackReply:
        raise NotImplementedError
