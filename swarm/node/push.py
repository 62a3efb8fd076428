"""Server-to-server push: a node that finishes a step sends its output straight to the next node of the
client's chain, whose session runs it as if the client had sent it (both reply to the client as well).

An inference stream reads its requests through a StepInbox, which merges what the client sends with the
steps other nodes push (rpc_push) into the same session. Only a session whose client opened it with
`accept_push` takes pushed steps, and only ones that continue it exactly where it stands.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from hivemind.p2p import P2P

from swarm.node.errors import RequestError, to_error_proto
from swarm.proto import swarm_pb2
from swarm.protocol import NodeProtocol

PUSH_TIMEOUT = 5.0  # seconds for the next node to take a pushed step (not to compute it): about a round trip
MAX_QUEUED_PUSHES = 1  # a session runs one step at a time: a second queued push is not its client's


@dataclass
class PushedStep:
    """A step another node pushed, checked on arrival (`parsed`: what the session's step needs)."""

    request: swarm_pb2.InferenceRequest
    parsed: Any


class StepInbox:
    """What one inference stream reads next: its client's requests, the steps pushed into its session, and
    notices for the client that a push of this session's output failed."""

    def __init__(self, requests: AsyncIterator):
        self._requests = aiter(requests)
        self._client: asyncio.Future | None = None  # the client's next request, read in the background
        self._pushed: asyncio.Queue[PushedStep] = asyncio.Queue(maxsize=MAX_QUEUED_PUSHES)
        self._notices: asyncio.Queue[swarm_pb2.InferenceResponse] = asyncio.Queue()

    @property
    def has_pushed(self) -> bool:
        return not self._pushed.empty()

    def push(self, step: PushedStep) -> None:
        """Queue a pushed step for the session (refused while another waits)."""
        try:
            self._pushed.put_nowait(step)
        except asyncio.QueueFull:
            raise RequestError(swarm_pb2.Error.BAD_REQUEST, "the session has a pushed step waiting") from None

    def notify(self, notice: swarm_pb2.InferenceResponse) -> None:
        """A reply for the client that comes from no request (a failed push's notice)."""
        self._notices.put_nowait(notice)

    async def next(
        self, timeout: float
    ) -> swarm_pb2.InferenceRequest | PushedStep | swarm_pb2.InferenceResponse | None:
        """The next notice, pushed step or client request; None when the client ended its stream.
        TimeoutError when none came within `timeout` seconds."""
        for queue in (self._notices, self._pushed):
            if not queue.empty():
                return queue.get_nowait()
        if self._client is None:
            self._client = asyncio.ensure_future(anext(self._requests))
        local = [asyncio.ensure_future(queue.get()) for queue in (self._notices, self._pushed)]
        try:
            await asyncio.wait({self._client, *local}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for getter in local:
                if not getter.done():
                    getter.cancel()  # asyncio.Queue keeps the item of a cancelled get()
        got = [getter.result() for getter in local if getter.done() and not getter.cancelled()]
        if got:
            if len(got) == 2:  # a notice and a pushed step at once: the step waits for the next call
                self._pushed.put_nowait(got[1])
            return got[0]
        if self._client.done():
            request, self._client = self._client, None
            try:
                return request.result()
            except StopAsyncIteration:
                return None
        raise TimeoutError

    async def drain(self, timeout: float, max_messages: int) -> None:
        """Read and drop the client's requests until it closes (see NodeServicer._drain)."""
        for _ in range(max_messages):
            if self._client is None:
                self._client = asyncio.ensure_future(anext(self._requests))
            try:
                await asyncio.wait_for(asyncio.shield(self._client), timeout)
            except (StopAsyncIteration, TimeoutError):
                return
            finally:
                if self._client.done():
                    self._client = None

    def close(self) -> None:
        if self._client is not None and not self._client.done():
            self._client.cancel()


def pushed_request(
    request: swarm_pb2.InferenceRequest, output: swarm_pb2.Tensor
) -> tuple[str, swarm_pb2.InferenceRequest]:
    """(next peer id, the step its session gets): this step's output, positions and mask, and the rest of
    the chain."""
    target, rest = request.push_to[0], request.push_to[1:]
    step = swarm_pb2.InferenceRequest(
        session_id=target.session_id,
        position=request.position,
        tensors=[output],
        step_id=request.step_id,
        push_to=rest,
    )
    for name in ("attention_mask", "position_ids"):
        if request.HasField(name):
            getattr(step, name).CopyFrom(getattr(request, name))
    if target.HasField("hypo_ids"):
        step.hypo_ids.CopyFrom(target.hypo_ids)
    return target.peer_id, step


async def push_step(
    p2p: P2P, owner: str, request: swarm_pb2.InferenceRequest, output: swarm_pb2.Tensor
) -> swarm_pb2.Error | None:
    """Push a finished step's output to the next node of the chain; the error if it did not take it."""
    try:
        peer_id, step = pushed_request(request, output)
        stub = NodeProtocol.stub(p2p, peer_id)
        reply = await asyncio.wait_for(
            stub.rpc_push(swarm_pb2.PushRequest(owner=owner, step=step)), PUSH_TIMEOUT
        )
    except Exception as e:
        error = to_error_proto(e)
        if error.code == swarm_pb2.Error.INTERNAL:  # not a node's answer: say what failed here
            error.message = f"push to the next node failed: {type(e).__name__}: {e}"[:500]
        return error
    return reply.error if reply.HasField("error") else None
