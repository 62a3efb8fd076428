"""The RPCs a node serves, as typed hivemind handlers: the node implements them, clients get stubs.

hivemind derives both the handler registration and the client stub from these signatures, so they are
the single contract. Handler names on the wire are "NodeServicer.rpc_*" whichever class serves them.
Training nodes serve the same RPCs over a trainable backend.
"""

from __future__ import annotations

from typing import AsyncIterator  # noqa: UP035 (hivemind recognises streams by typing.AsyncIterator only)

from hivemind.p2p import P2PContext

from swarm.proto import swarm_pb2
from swarm.protocol.base import Protocol


class NodeProtocol(Protocol):
    """rpc_info; rpc_forward / rpc_backward (unary, < 4 MiB) and their *_stream twins; rpc_inference and
    rpc_push (a step one node sends the next in a client's chain)."""

    SERVICE_NAME = "NodeServicer"

    async def rpc_info(self, request: swarm_pb2.InfoRequest, context: P2PContext) -> swarm_pb2.InfoResponse:
        """What the node serves, its limits and its model."""
        raise NotImplementedError

    async def rpc_forward(
        self, request: swarm_pb2.ForwardRequest, context: P2PContext
    ) -> swarm_pb2.ForwardResponse:
        """Hidden states through part of the node's span."""
        raise NotImplementedError

    async def rpc_forward_stream(
        self, requests: AsyncIterator[swarm_pb2.ForwardRequest], context: P2PContext
    ) -> AsyncIterator[swarm_pb2.ForwardResponse]:
        """rpc_forward for requests or replies above the unary message limit, in parts."""
        raise NotImplementedError
        yield  # an async generator, like its implementations

    async def rpc_backward(
        self, request: swarm_pb2.BackwardRequest, context: P2PContext
    ) -> swarm_pb2.BackwardResponse:
        """Gradients w.r.t. a span's inputs (stateless: the node recomputes the forward)."""
        raise NotImplementedError

    async def rpc_backward_stream(
        self, requests: AsyncIterator[swarm_pb2.BackwardRequest], context: P2PContext
    ) -> AsyncIterator[swarm_pb2.BackwardResponse]:
        """rpc_backward in parts."""
        raise NotImplementedError
        yield

    async def rpc_inference(
        self, requests: AsyncIterator[swarm_pb2.InferenceRequest], context: P2PContext
    ) -> AsyncIterator[swarm_pb2.InferenceResponse]:
        """One inference session per stream, with a KV cache on the node; one reply per request."""
        raise NotImplementedError
        yield

    async def rpc_push(self, request: swarm_pb2.PushRequest, context: P2PContext) -> swarm_pb2.PushResponse:
        """A step of an open inference session, pushed by the previous node of its client's chain."""
        raise NotImplementedError
