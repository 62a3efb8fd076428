"""The RPCs of refereed verification (Verde): commit to the trace of one forward, then answer a dispute.

A client sends the same input to two nodes with rpc_commit; when their commitments differ, it referees
the bisection game of swarm.verification.dispute, asking both the same questions with rpc_dispute_answer
(client side: swarm.verification.remote; node side: swarm.verification.service).
"""

from __future__ import annotations

from hivemind.p2p import P2PContext

from swarm.proto import swarm_pb2
from swarm.protocol.base import Protocol


class VerificationProtocol(Protocol):
    """rpc_commit: run, keep the trace, return the commitment; rpc_dispute_answer: one round's answer."""

    SERVICE_NAME = "Verify"

    async def rpc_commit(
        self, request: swarm_pb2.CommitRequest, context: P2PContext
    ) -> swarm_pb2.CommitResponse:
        """Run blocks [start, end) with every operator traced; keep the trace under request_id."""
        raise NotImplementedError

    async def rpc_dispute_answer(
        self, request: swarm_pb2.DisputeQuestionRequest, context: P2PContext
    ) -> swarm_pb2.DisputeAnswerResponse:
        """Digests with Merkle proofs, or tensors, of the kept trace named by request_id."""
        raise NotImplementedError
