"""RPCs of training participants beyond forward and backward: a peer's training state, its contribution to a
round, and gradient disputes about it."""

from __future__ import annotations

from typing import AsyncIterator  # noqa: UP035 (hivemind recognises streams by typing.AsyncIterator only)

from hivemind.p2p import P2PContext

from swarm.proto import swarm_pb2
from swarm.protocol.base import Protocol


class TrainStateProtocol(Protocol):
    """Served by stage peers (their blocks) and trainers (embeddings, norm, head)."""

    SERVICE_NAME = "TrainState"

    async def rpc_train_progress(
        self, request: swarm_pb2.TrainProgressRequest, context: P2PContext
    ) -> swarm_pb2.TrainProgressResponse:
        """The step, the samples toward the next one and the parameters' fingerprint, right now."""
        raise NotImplementedError

    async def rpc_train_state(
        self, request: swarm_pb2.TrainStateRequest, context: P2PContext
    ) -> AsyncIterator[swarm_pb2.TrainStateResponse]:
        """Parameters (and optimizer state) with the step they are at, in parts."""
        raise NotImplementedError
        yield

    async def rpc_train_contribution(
        self, request: swarm_pb2.TrainContributionRequest, context: P2PContext
    ) -> AsyncIterator[swarm_pb2.TrainContributionResponse]:
        """Stage peers: the gradient sent in one step's round and the signed microbatches behind it."""
        raise NotImplementedError
        yield

    async def rpc_train_dispute_commit(
        self, request: swarm_pb2.TrainDisputeCommitRequest, context: P2PContext
    ) -> swarm_pb2.CommitResponse:
        """Stage peers: commit to a trace of a contribution (one's own, or one it accused) for a judge."""
        raise NotImplementedError

    async def rpc_train_dispute_answer(
        self, request: swarm_pb2.DisputeQuestionRequest, context: P2PContext
    ) -> swarm_pb2.DisputeAnswerResponse:
        """Stage peers: one round of a gradient dispute about a trace committed to that caller."""
        raise NotImplementedError
