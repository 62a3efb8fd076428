"""The wire interface between clients and nodes: RPC names and types, stubs, and message-size limits.

Both sides import this package; neither imports the other's internals.
"""

from swarm.protocol.limits import MAX_UNARY_MESSAGE_BYTES, STREAM_CHUNK_BYTES
from swarm.protocol.node import NodeProtocol
from swarm.protocol.training import TrainStateProtocol
from swarm.protocol.verification import VerificationProtocol

__all__ = [
    "MAX_UNARY_MESSAGE_BYTES",
    "STREAM_CHUNK_BYTES",
    "NodeProtocol",
    "TrainStateProtocol",
    "VerificationProtocol",
]
