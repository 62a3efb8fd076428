"""A second opinion before blaming the client's own request.

A node that answers BAD_REQUEST or TOO_LARGE says the request is at fault, and the client raises
RequestRefused without retrying. A node could say so of every request (a bug, or to shed work while staying
routed to), and a single such node would then fail every call routed through it. So before raising, the
client sends the same request to one other node serving those blocks: if that node refuses too, the request
was at fault; if it serves it, the first node was (banned for BAD_REQUEST; nodes' size limits differ, so a
TOO_LARGE only makes the client route around it for this call).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from swarm.client.errors import RemoteError, RequestRefused
from swarm.proto import swarm_pb2

if TYPE_CHECKING:
    from swarm.client.routing import RemoteSpan
    from swarm.client.swarm_client import SwarmClient

logger = logging.getLogger(__name__)


class SecondOpinion:
    """The state of one call (a forward chunk, a backward range, an inference step) whose request a node
    refused: at most one other node is asked."""

    def __init__(self, client: SwarmClient):
        self.client = client
        self.refusal: RemoteError | None = None

    @property
    def excluded(self) -> frozenset[str]:
        """Nodes this call must not be routed to again."""
        return frozenset() if self.refusal is None else frozenset({self.refusal.peer_id})

    def refused(self, error: RemoteError, span: RemoteSpan) -> frozenset[str]:
        """A node refused the request itself: returns the nodes to route around when asking another one;
        raises RequestRefused when another node refused it already, or no other node serves the span's
        first block."""
        if self.refusal is not None or not self.client.serves_without(error.peer_id, span.start):
            raise RequestRefused(error) from error
        logger.info("node %s refused the request (%s); asking another node", error.peer_id, error)
        self.refusal = error
        return self.excluded

    def served(self) -> None:
        """Another node served what the first refused: the first was at fault."""
        if self.refusal is None:
            return
        refusal, self.refusal = self.refusal, None
        if refusal.code == swarm_pb2.Error.BAD_REQUEST:
            logger.warning(
                "node %s called a request malformed that another node served; banning it", refusal.peer_id
            )
            self.client.ban(refusal.peer_id)
