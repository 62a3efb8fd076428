"""A participant's training state on the wire: named tensors with the optimizer step they are at.

Stage peers serve their blocks' parameters and AdamW moments (a joiner loads them before it trains);
trainers serve their embeddings, norm and head (an export collects them). The state hash covers every
name, dtype, shape and byte plus the step, so a joiner can prove it holds exactly what the donor has.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator  # noqa: UP035 (hivemind recognises streams by typing.AsyncIterator only)

import torch
from hivemind.p2p import P2P, P2PContext

from swarm.node.errors import to_error_proto
from swarm.proto import swarm_pb2
from swarm.protocol import STREAM_CHUNK_BYTES, TrainStateProtocol
from swarm.training.validation import Contribution, stream_contribution
from swarm.utils.streaming import TensorAssembler, batch_parts, hold_until_caller_closes, split_tensors
from swarm.utils.tensors import FLOAT_DTYPES, INDEX_DTYPES, deserialize_checked, serialize

logger = logging.getLogger(__name__)

MAX_STATE_BYTES = 64 * 1024**3
STATE_DTYPES = {**FLOAT_DTYPES, **INDEX_DTYPES}


@dataclass
class TrainState:
    """Named tensors at an optimizer step."""

    step: int
    tensors: dict[str, torch.Tensor]

    def hash(self) -> str:
        return state_hash(self.step, self.tensors)


def state_hash(step: int, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the step and every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256(f"step={step}".encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class RemoteStateError(RuntimeError):
    """A peer refused to send its state, or sent one that does not check out."""


class TrainStateServicer(TrainStateProtocol):
    """Serves `get_state(with_optimizer)` and `get_progress()` -> (step, samples, fingerprint) to peers of
    the same run (same run-file hash)."""

    def __init__(
        self,
        run_hash: str,
        get_state: Callable[[bool], Awaitable[TrainState]],
        get_progress: Callable[[], tuple[int, int, list[float]]],
        get_contribution: Callable[[int], Contribution | None] | None = None,
    ):
        self.run_hash, self.get_state, self.get_progress = run_hash, get_state, get_progress
        self.get_contribution = get_contribution  # stage peers: their contribution to a round, for validators
        self.stage_prefix = ""  # the averaging key prefix of the stage it trains now (set by the node)
        self.refuse_peer: Callable[[str], str | None] | None = None  # e.g. peers banned from the run
        # stage peers: their side of gradient disputes (swarm.training.disputes.GradientDisputeService)
        self.disputes = None

    def _refusal(self, context: P2PContext) -> swarm_pb2.Error | None:
        reason = self.refuse_peer(context.remote_id.to_base58()) if self.refuse_peer is not None else None
        return None if reason is None else swarm_pb2.Error(code=swarm_pb2.Error.FORBIDDEN, message=reason)

    async def rpc_train_progress(
        self, request: swarm_pb2.TrainProgressRequest, context: P2PContext
    ) -> swarm_pb2.TrainProgressResponse:
        if request.run_hash != self.run_hash:
            error = swarm_pb2.Error(code=swarm_pb2.Error.BAD_REQUEST, message="this peer trains another run")
            return swarm_pb2.TrainProgressResponse(error=error)
        if (refusal := self._refusal(context)) is not None:
            return swarm_pb2.TrainProgressResponse(error=refusal)
        step, samples, fingerprint = self.get_progress()
        return swarm_pb2.TrainProgressResponse(step=step, samples=samples, fingerprint=fingerprint)

    async def rpc_train_state(
        self, request: swarm_pb2.TrainStateRequest, context: P2PContext
    ) -> AsyncIterator[swarm_pb2.TrainStateResponse]:
        if request.run_hash != self.run_hash:
            error = swarm_pb2.Error(code=swarm_pb2.Error.BAD_REQUEST, message="this peer trains another run")
            yield swarm_pb2.TrainStateResponse(error=error)
            return
        if (refusal := self._refusal(context)) is not None:
            yield swarm_pb2.TrainStateResponse(error=refusal)
            return
        try:
            state = await self.get_state(request.with_optimizer)
        except Exception as e:
            logger.warning("state for %s failed: %r", context.remote_id, e, exc_info=True)
            error = to_error_proto(e)
            yield swarm_pb2.TrainStateResponse(error=error)
            return
        names = sorted(state.tensors)
        parts = split_tensors([serialize(state.tensors[name]) for name in names], STREAM_CHUNK_BYTES)
        yield swarm_pb2.TrainStateResponse(step=state.step, state_hash=state.hash(), names=names)
        for batch in batch_parts(parts, STREAM_CHUNK_BYTES):
            yield swarm_pb2.TrainStateResponse(tensors=batch)
        await hold_until_caller_closes()

    async def rpc_train_contribution(
        self, request: swarm_pb2.TrainContributionRequest, context: P2PContext
    ) -> AsyncIterator[swarm_pb2.TrainContributionResponse]:
        error = None
        if request.run_hash != self.run_hash:
            error = swarm_pb2.Error(code=swarm_pb2.Error.BAD_REQUEST, message="this peer trains another run")
        elif self.get_contribution is None:
            error = swarm_pb2.Error(code=swarm_pb2.Error.BAD_REQUEST, message="this peer trains no stage")
        elif request.prefix and self.stage_prefix and request.prefix != self.stage_prefix:
            # it moved: its rounds of that stage went with that stage's log, and this one's steps are not them
            error = swarm_pb2.Error(
                code=swarm_pb2.Error.UNKNOWN_BLOCKS,
                message=f"this peer trains another stage now ({self.stage_prefix[-64:]})",
            )
        else:
            error = self._refusal(context)
        if error is not None:
            yield swarm_pb2.TrainContributionResponse(error=error)
            return
        async for response in stream_contribution(self.get_contribution(int(request.step))):
            yield response
        await hold_until_caller_closes()

    async def rpc_train_dispute_commit(
        self, request: swarm_pb2.TrainDisputeCommitRequest, context: P2PContext
    ) -> swarm_pb2.CommitResponse:
        if (error := self._dispute_refusal(request.run_hash, context)) is not None:
            return swarm_pb2.CommitResponse(error=error)
        return await self.disputes.commit(request, context)

    async def rpc_train_dispute_answer(
        self, request: swarm_pb2.DisputeQuestionRequest, context: P2PContext
    ) -> swarm_pb2.DisputeAnswerResponse:
        if (error := self._dispute_refusal(self.run_hash, context)) is not None:
            return swarm_pb2.DisputeAnswerResponse(error=error)
        return await self.disputes.answer(request, context)

    def _dispute_refusal(self, run_hash: str, context: P2PContext) -> swarm_pb2.Error | None:
        if run_hash != self.run_hash:
            return swarm_pb2.Error(code=swarm_pb2.Error.BAD_REQUEST, message="this peer trains another run")
        if self.disputes is None:
            return swarm_pb2.Error(code=swarm_pb2.Error.BAD_REQUEST, message="this peer trains no stage")
        return self._refusal(context)


async def fetch_progress(
    p2p: P2P, peer_id: str, run_hash: str, timeout: float
) -> tuple[int, int, list[float]]:
    """A peer's (step, samples toward the next step, fingerprint), asked directly."""
    stub = TrainStateProtocol.stub(p2p, peer_id)
    response = await stub.rpc_train_progress(
        swarm_pb2.TrainProgressRequest(run_hash=run_hash), timeout=timeout
    )
    if response.HasField("error"):
        raise RemoteStateError(f"{peer_id} refused its progress: {response.error.message}")
    return int(response.step), int(response.samples), list(response.fingerprint)


class _StreamCutShort(RemoteStateError):
    """The stream ended before all the state it announced had arrived."""


FETCH_ATTEMPTS = 3


async def fetch_state(
    p2p: P2P, peer_id: str, run_hash: str, with_optimizer: bool, timeout: float
) -> TrainState:
    """Download a peer's training state and check it against the hash the peer sent with it.

    A stream cut short is fetched again (up to FETCH_ATTEMPTS times within `timeout`); a refusal, a bad
    tensor or a wrong hash is not.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    for attempt in range(1, FETCH_ATTEMPTS + 1):
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise TimeoutError(f"no complete state from {peer_id} in {timeout} s")
        try:
            header, tensors = await asyncio.wait_for(
                _download_state(p2p, peer_id, run_hash, with_optimizer), left
            )
            break
        except _StreamCutShort as e:
            if attempt == FETCH_ATTEMPTS:
                raise
            logger.info("state from %s was cut short (%s); fetching it again", peer_id, e)
    state = TrainState(
        int(header.step),
        {
            name: deserialize_checked(
                proto, name=name, allowed_dtypes=STATE_DTYPES, ndim=None, max_bytes=MAX_STATE_BYTES
            )
            for name, proto in zip(header.names, tensors, strict=True)
        },
    )
    if state.hash() != header.state_hash:
        raise RemoteStateError(f"{peer_id}'s state does not match the hash it sent")
    return state


async def _download_state(
    p2p: P2P, peer_id: str, run_hash: str, with_optimizer: bool
) -> tuple[swarm_pb2.TrainStateResponse, list]:
    """(header, one tensor proto per name), closing the stream from this side once all have arrived."""
    stub = TrainStateProtocol.stub(p2p, peer_id)
    request = swarm_pb2.TrainStateRequest(run_hash=run_hash, with_optimizer=with_optimizer)
    header, assembler = None, TensorAssembler(MAX_STATE_BYTES)
    async with aclosing(await stub.rpc_train_state(request)) as stream:
        async for response in stream:
            if response.HasField("error"):
                raise RemoteStateError(f"{peer_id} refused its state: {response.error.message}")
            header = header or response
            assembler.extend(response.tensors)
            if assembler.has(len(header.names)):
                break
    if header is None:
        raise _StreamCutShort(f"{peer_id} sent no state")
    if not assembler.has(len(header.names)):
        raise _StreamCutShort(
            f"{peer_id} sent {len(assembler.tensors)} tensors for {len(header.names)} names"
        )
    if len(assembler.tensors) != len(header.names):
        raise RemoteStateError(
            f"{peer_id} sent {len(assembler.tensors)} tensors for {len(header.names)} names"
        )
    return header, assembler.tensors
