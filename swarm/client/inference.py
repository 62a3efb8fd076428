"""Client side of inference sessions: a chain of per-node streams, driven step by step from the client.

The client sends each step's hidden states to the first node of the route, takes its output to the
next node, and so on (a client-driven chain). With `ClientConfig.push`, it sends a step to the first node
only, naming the rest of the chain, and each node pushes its output on to the next one (server-to-server
push); every node still replies to the client, which gets each span's output as before. It keeps every
span's inputs, so when a node fails the client replays that span's history on a replacement chain and
carries on; the other spans keep their caches untouched.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from hivemind.p2p import P2P, P2PHandlerError

from swarm.client.config import ClientConfig
from swarm.client.errors import MissingBlocksError, RemoteError, RequestRefused, blame, check_finite
from swarm.client.remote import get_info
from swarm.client.routing import RemoteSpan, quant_of
from swarm.client.second_opinion import SecondOpinion
from swarm.dht.relay import connect_through
from swarm.proto import swarm_pb2
from swarm.protocol import NodeProtocol
from swarm.utils.tensors import FLOAT_DTYPES, deserialize_checked, serialize

if TYPE_CHECKING:
    from swarm.client.swarm_client import SwarmClient
    from swarm.verification.spot_check import SpotCheck

logger = logging.getLogger(__name__)

BUSY_COOL_DOWN = 5.0  # seconds a node that answered OVERLOADED or TIMEOUT is skipped (no ban)

# one step's hidden states stay well below hivemind's message limits; longer prefills go in chunks
MAX_STEP_BYTES = 2 * 1024 * 1024
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
# spot checks left running behind generation at once; past this a step's check is waited for (each one
# recomputes the span's whole prefix on two nodes, so a backlog would only grow)
MAX_DEFERRED_CHECKS = 4
# pushes that failed although their target answered the client (not explained by a recovery): past this
# many the session drives its chain itself
MAX_PUSH_ERRORS = 3


class SpanStream:
    """One node's part of a session: an open `rpc_inference` stream, one reply per step.

    With `accept_push`, the session there also takes steps the previous node of the chain pushes to it; it
    replies to those on this stream too, under the step id the client gave the step."""

    def __init__(
        self,
        p2p: P2P,
        span: RemoteSpan,
        session_id: str,
        max_length: int,
        timeout: float,
        liveness_period: float = ClientConfig.liveness_period,
        accept_push: bool = False,
    ):
        self.p2p, self.span, self.session_id = p2p, span, session_id
        self.max_length, self.timeout, self.liveness_period = max_length, timeout, liveness_period
        self.accept_push = accept_push
        # requests wait here for the stream, which opens with the first step (libp2p may not finish
        # opening it earlier); the queue binds to the client's loop on first use
        self._queue: asyncio.Queue | None = asyncio.Queue()
        self._responses = None
        # every reply (or the exception that ended the stream), read in the background so that waiting
        # for one can be given up without breaking the stream
        self._replies: asyncio.Queue = asyncio.Queue()
        self._reader: asyncio.Task | None = None
        self._opened = False
        self.serving = False  # the node opened the session (answered a step of it)
        self.echoes_step_ids = False  # its replies carry step ids: a node that knows push (older ones do not)
        self.num_sent = 0  # requests the client sent (pushed steps not counted)

    async def _requests(self):
        while True:
            request = await self._queue.get()
            if request is None:
                return
            yield request

    def request(
        self,
        hidden: torch.Tensor,
        position: int,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        prompts: torch.Tensor | None = None,
        hypo_ids: torch.Tensor | None = None,
        step_id: int = 0,
        push_to: list[swarm_pb2.PushTarget] | None = None,
    ) -> swarm_pb2.InferenceRequest:
        """A step's request (the first one opens the session)."""
        request = swarm_pb2.InferenceRequest(
            position=position,
            tensors=[serialize(hidden)],
            position_ids=serialize(position_ids),
            step_id=step_id,
            push_to=push_to or [],
        )
        if attention_mask is not None:
            request.attention_mask.CopyFrom(serialize(attention_mask))
        if prompts is not None:
            request.prompts.CopyFrom(serialize(prompts))
        if hypo_ids is not None:
            request.hypo_ids.CopyFrom(serialize(hypo_ids))
        return request

    async def step(
        self,
        hidden: torch.Tensor,
        position: int,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        prompts: torch.Tensor | None = None,
        hypo_ids: torch.Tensor | None = None,
        step_id: int = 0,
    ) -> torch.Tensor:
        """Send new tokens' hidden states (with the span's deep prompts at position 0, and the cache rows
        to keep before the step); returns the span's outputs for them."""
        await self.send(
            self.request(hidden, position, attention_mask, position_ids, prompts, hypo_ids, step_id)
        )
        return await self.receive(step_id, position, hidden.shape)

    async def send(self, request: swarm_pb2.InferenceRequest) -> None:
        """Queue a request on the stream, opening it (and the session) with the first."""
        if not self._opened:
            request.session_id, request.max_length = self.session_id, self.max_length
            request.start_block, request.end_block = self.span.start, self.span.end
            request.accept_push = self.accept_push
            self._opened = True
        self._queue.put_nowait(request)
        self.num_sent += 1
        if self._responses is None:
            if self.span.info.relay_maddrs:  # behind NAT: dial it through its relays (swarm.dht.relay)
                await connect_through(self.p2p, self.span.peer_id, self.span.info.relay_maddrs, self.timeout)
            stub = NodeProtocol.stub(self.p2p, self.span.peer_id)
            self._responses = await asyncio.wait_for(stub.rpc_inference(self._requests()), self.timeout)
            self._reader = asyncio.ensure_future(self._read_replies())

    async def _read_replies(self) -> None:
        try:
            async for response in self._responses:
                self._replies.put_nowait(response)
            self._replies.put_nowait(
                RemoteError(self.span.peer_id, swarm_pb2.Error(message="the node closed the session stream"))
            )
        except Exception as e:
            self._replies.put_nowait(e)

    async def receive(self, step_id: int, position: int, shape: torch.Size) -> torch.Tensor:
        """The span's output for step `step_id` (sent at `position` with hidden states of `shape`); replies
        to steps the client went on without are dropped."""
        while True:
            response = await self._next_reply()
            if response.step_id not in (step_id, 0) or response.HasField("push_error"):
                continue  # 0: a node that does not echo step ids (one reply per request)
            break
        if response.HasField("error"):
            raise RemoteError(self.span.peer_id, response.error)
        if len(response.tensors) != 1 or response.position != position + shape[1]:
            raise RemoteError(self.span.peer_id, swarm_pb2.Error(message="malformed inference reply"))
        output = deserialize_checked(
            response.tensors[0],
            name="output",
            allowed_dtypes=FLOAT_DTYPES,
            ndim=3,
            max_bytes=MAX_RESPONSE_BYTES,
        )
        if output.shape != shape:
            raise RemoteError(
                self.span.peer_id,
                swarm_pb2.Error(message=f"output shape {tuple(output.shape)} != input {tuple(shape)}"),
            )
        check_finite(self.span.peer_id, [output])
        self.serving, self.echoes_step_ids = True, response.step_id == step_id != 0
        return output

    async def push_failure(self, step_id: int) -> swarm_pb2.Error:
        """Wait for the node to say that it could not push step `step_id` on to the next node; if it pushed
        it, this never returns (cancel it)."""
        while True:
            reply = await self._replies.get()
            if isinstance(reply, BaseException):  # no notice can come any more
                self._replies.put_nowait(reply)
                await asyncio.Future()
            if reply.step_id == step_id and reply.HasField("push_error"):
                return reply.push_error

    async def _next_reply(self) -> swarm_pb2.InferenceResponse:
        """The stream's next reply, within the request timeout. A reply late by `liveness_period` has the
        node asked for its info on a new stream (within twice that): an open stream to a node that died
        (killed, or its link cut) can stay silent until the timeout, while a busy node still answers."""
        reply = asyncio.ensure_future(self._replies.get())
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                left = deadline - time.monotonic()
                done, _ = await asyncio.wait({reply}, timeout=max(0.0, min(self.liveness_period, left)))
                if done:
                    return self._unwrap(reply.result())
                if left <= self.liveness_period:
                    raise TimeoutError(f"no reply from {self.span.peer_id} within {self.timeout:g} s")
                try:  # a generous bound: a node whose event loop is merely slow must not be left for dead
                    await get_info(self.p2p, self.span.peer_id, min(2 * self.liveness_period, left))
                except P2PHandlerError:
                    pass  # its handler answered, with an error: the node is alive
                except Exception as e:
                    if reply.done():
                        return self._unwrap(reply.result())
                    raise ConnectionError(
                        f"{self.span.peer_id} sent no reply for {self.liveness_period:g} s and does not "
                        f"answer: {e!r}"
                    ) from e
        finally:
            if not reply.done():
                reply.cancel()  # asyncio.Queue keeps the item of a cancelled get()

    def _unwrap(self, reply: swarm_pb2.InferenceResponse | BaseException) -> swarm_pb2.InferenceResponse:
        if isinstance(reply, BaseException):
            self._replies.put_nowait(reply)  # the stream stays ended for whoever reads next
            raise reply
        return reply

    async def abandon(self) -> None:
        """Drop the stream without a close message, as a crashed client would (the node frees the cache)."""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._responses is not None:
            await asyncio.wait_for(self._responses.aclose(), 1.0)

    async def close(self) -> None:
        """Ask the node to free the cache, then drop the stream (the node frees it on disconnect too)."""
        if self._queue is None:
            return
        self._queue.put_nowait(swarm_pb2.InferenceRequest(close=True))
        self._queue.put_nowait(None)
        try:
            if self._reader is not None:  # the node ends the stream after `close`
                await asyncio.wait_for(self._reader, 1.0)
            if self._responses is not None:
                await asyncio.wait_for(self._responses.aclose(), 1.0)
        except Exception as e:  # the node may be gone already
            logger.debug("closing stream to %s: %r", self.span.peer_id, e)
        self._queue = None


@dataclass(frozen=True, eq=False)
class SessionPrompts:
    """Trained prompts a session puts in front of the caller's tokens in every node's KV cache."""

    embeddings: torch.Tensor  # (prefix, hidden): the input prompts, before the first token (ptune)
    deep: torch.Tensor | None = None  # (blocks, prefix, hidden): added to each block's input (deep_ptune)

    @property
    def length(self) -> int:
        return self.embeddings.shape[0]


@dataclass(eq=False)
class _SpanState:
    span: RemoteSpan
    stream: SpanStream
    inputs: list[torch.Tensor] = field(default_factory=list)  # every step's input, for replay
    reorder: torch.Tensor | None = None  # hypo_ids its node has yet to apply, with its next step


@dataclass(eq=False)
class _DeferredCheck:
    """A spot check still running after its step's output was used: if it fails, the session rewinds."""

    future: concurrent.futures.Future
    state: _SpanState
    position: int  # where the checked step started
    output: torch.Tensor  # what the node served for it


class InferenceSession:
    """A generation session across the swarm with a server-side KV cache on every node of the route.

    Use it as a context manager (`with model.inference_session(max_length=...) as session`) so the
    nodes free their caches when you are done. Generation state (the tokens so far) lives here too,
    so `model.generate(None, session=session)` continues where the last call stopped.

    With `prompts` (a prompt-tuned model's), the first step puts them before the caller's tokens: the nodes
    hold `prompts.length` more positions than the caller fed (`position` counts them, `num_tokens` does
    not), and `max_length` counts the caller's tokens only.
    """

    def __init__(self, client: SwarmClient, max_length: int, prompts: SessionPrompts | None = None):
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.client, self.max_length = client, max_length
        self.prompts = prompts
        self.prefix_length = 0 if prompts is None else prompts.length
        self.session_id = uuid.uuid4().hex
        self._streams_opened = itertools.count()  # each span's stream gets its own id (see _open_chain)
        self._step_ids = itertools.count(1)  # replies carry their step's id: late ones are told apart
        self.num_push_errors = 0  # since the last recovery (MAX_PUSH_ERRORS)
        # the next step rewinds the nodes' caches: nodes take only steps that continue a session by push
        self._rewound = False
        self.position = 0  # positions whose keys and values the nodes hold (the prompts' included)
        self.output_ids: torch.Tensor | None = None  # every token of the session, fed or pending
        self.attention_mask: torch.Tensor | None = None  # (batch, len(output_ids))
        self._position_ids: torch.Tensor | None = None  # (batch, position): for replay
        self._spans: list[_SpanState] = []
        self._closed = False
        self.num_recoveries = 0
        self.spot_checks: list[SpotCheck] = []  # what the client's spot checks found in this session
        # spot checks that do not hold up the steps after theirs (generate() turns this on): the caller
        # settles them with settle_checks(), and a failed one rewinds the session to the step it checked
        self.defer_checks = False
        self.num_rewinds = 0
        self._deferred: list[_DeferredCheck] = []
        self._recheck_start: int | None = None  # after a rewind, the replaced span's next step is checked
        self._mask: torch.Tensor | None = None  # the last step's attention mask, for replays after a rewind
        # called with the new position after every step that reached the last block (tests, progress bars)
        self.on_step: Callable[[int], None] | None = None
        # called as (span, new tokens, seconds) after every successful round trip to one span (profiling)
        self.on_hop: Callable[[RemoteSpan, int, float], None] | None = None

    @property
    def route(self) -> list[RemoteSpan]:
        return [state.span for state in self._spans]

    @property
    def check_backlog(self) -> int:
        """How many deferred checks may stay running before a step: room for one check per span of it."""
        return max(0, MAX_DEFERRED_CHECKS - max(1, len(self._spans)))

    @property
    def num_tokens(self) -> int:
        """The caller's tokens the nodes hold (the tuned prompts' positions not counted)."""
        return max(0, self.position - self.prefix_length)

    @property
    def batch_size(self) -> int | None:
        return None if self.output_ids is None else self.output_ids.shape[0]

    def step(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        hypo_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """New tokens' hidden states through every block; long inputs go in chunks.

        `attention_mask` covers the caller's tokens so far including these: (batch, num_tokens + new), and
        `position_ids` count from the caller's first token (the tuned prompts' positions are added here).
        `hypo_ids` (batch,) reorder the rows the session holds before this step: row i continues what row
        hypo_ids[i] was (beam search); the caller's mask and positions must already be in the new order.
        The result is on `hidden`'s device; inputs kept for replay stay on CPU.
        """
        if self._closed:
            raise RuntimeError("the inference session is closed")
        batch, new_tokens, hidden_size = hidden.shape
        if self.num_tokens + new_tokens > self.max_length:
            raise ValueError(
                f"the session's max_length is {self.max_length}: it holds {self.num_tokens} tokens "
                f"and cannot take {new_tokens} more"
            )
        device, hidden = hidden.device, hidden.cpu()
        if hypo_ids is not None:
            self._reorder(hypo_ids, batch)
        if position_ids is None:
            position_ids = torch.arange(self.num_tokens, self.num_tokens + new_tokens).expand(batch, -1)
        position_ids = position_ids.cpu()
        if attention_mask is not None:
            attention_mask = attention_mask.cpu()
        prefix = 0
        if self.prompts is not None:
            hidden, position_ids, attention_mask, prefix = self._with_prompts(
                hidden, position_ids, attention_mask
            )
            new_tokens = hidden.shape[1]
        self._mask = attention_mask
        bytes_per_token = batch * hidden_size * hidden.element_size()
        chunk = self._chunk_tokens(bytes_per_token)
        outputs = []
        for offset in range(0, new_tokens, chunk):
            end = min(new_tokens, offset + chunk)
            mask = None
            if attention_mask is not None:
                mask = attention_mask[:, : self.position + end - offset]
            outputs.append(self._step_chunk(hidden[:, offset:end], position_ids[:, offset:end], mask))
        return torch.cat(outputs, dim=1)[:, prefix:].to(device)

    def truncate(self, num_tokens: int) -> None:
        """Forget the caller's tokens after the first `num_tokens`: the next step continues from there (each
        node overwrites those positions of its cache), as speculative decoding needs when it rejects
        drafted tokens. Checks still running are waited for first."""
        if not 0 <= num_tokens <= self.num_tokens:
            raise ValueError(f"can keep 0 to {self.num_tokens} tokens of this session, not {num_tokens}")
        if num_tokens == self.num_tokens:
            return
        if self.settle_checks() is not None and num_tokens >= self.num_tokens:
            return  # a failed check rewound it further already
        position = num_tokens + self.prefix_length if num_tokens else 0
        for state in self._spans:
            kept = torch.cat(state.inputs, dim=1)[:, :position] if state.inputs else None
            state.inputs = [kept] if kept is not None and kept.shape[1] else []
        self._position_ids = None if position == 0 else self._position_ids[:, :position]
        if self._mask is not None:
            self._mask = self._mask[:, :position]
        self.position = position
        self._rewound = True

    def _reorder(self, hypo_ids: torch.Tensor, batch: int) -> None:
        """Reorder what the session keeps for replay and checks; each node reorders its cache with its
        next step. A replacement node replays the reordered history and so needs no reordering."""
        hypo_ids = torch.as_tensor(hypo_ids).cpu()
        in_range = bool(((hypo_ids >= 0) & (hypo_ids < batch)).all())
        if hypo_ids.shape != (batch,) or hypo_ids.is_floating_point() or not in_range:
            raise ValueError(f"hypo_ids must be {batch} row indices in [0, {batch}), got {hypo_ids.tolist()}")
        if self.position == 0:
            raise ValueError("hypo_ids reorder what the session holds: it holds nothing yet")
        if self.defer_checks:
            raise ValueError(
                "hypo_ids cannot go with deferred spot checks (a failed one could not be undone)"
            )
        hypo_ids = hypo_ids.long()
        for state in self._spans:
            if state.inputs:
                state.inputs = [torch.cat(state.inputs, dim=1)[hypo_ids]]
            state.reorder = hypo_ids if state.reorder is None else state.reorder[hypo_ids]
        if self._position_ids is not None:
            self._position_ids = self._position_ids[hypo_ids]

    def _with_prompts(self, hidden: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None):
        """A step in the nodes' positions: the caller's shifted past the prompts, which go before the first
        step (again after a rewind to 0). Returns (hidden, position_ids, mask, prompt positions added)."""
        prefix = self.prefix_length
        batch = hidden.shape[0]
        position_ids = position_ids + prefix
        if mask is not None:
            mask = torch.cat([mask.new_ones(batch, prefix), mask], dim=1)
        if self.position > 0:
            return hidden, position_ids, mask, 0
        prompts = self.prompts.embeddings.to(hidden.dtype).expand(batch, -1, -1)
        hidden = torch.cat([prompts, hidden], dim=1)
        position_ids = torch.cat([torch.arange(prefix).expand(batch, -1), position_ids], dim=1)
        return hidden, position_ids, mask, prefix

    def _deep_prompts(self, span: RemoteSpan, position: int) -> torch.Tensor | None:
        """The span's deep prompts (blocks, 1, prefix, hidden) for a step at `position` (only at 0)."""
        if self.prompts is None or self.prompts.deep is None or position != 0:
            return None
        return self.prompts.deep[span.start : span.end].unsqueeze(1)

    def _chunk_tokens(self, bytes_per_token: int) -> int:
        # the first chunk carries the whole tuned prefix: deep prompts apply to one step's first positions
        chunk = max(1, min(self.client.config.max_step_tokens, MAX_STEP_BYTES // bytes_per_token))
        return max(chunk, self.prefix_length)

    def _step_chunk(self, hidden: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None):
        client = self.client
        if not self._spans:
            self._spans = self._open_chain(client.find_route())
        position = self.position
        index, failures = 0, 0
        opinion = SecondOpinion(client)
        force_check = False  # the step that replaces a convicted node's is checked too
        while index < len(self._spans):
            segment = self._push_segment(index, position)
            if segment:
                served, error = client.run_async(
                    self._push_step(segment, hidden, position, mask, position_ids)
                )
                for output, seconds in served:
                    self._served(self._spans[index], hidden, seconds, opinion)
                    hidden = output
                    index += 1
                if error is not None:
                    failures = self._hop_failed(error, index, position, mask, failures, opinion)
                continue
            state = self._spans[index]
            started = time.perf_counter()
            # commitments cover the blocks' plain forward: steps with deep prompts cannot be checked
            deep_prompts = self.prompts is not None and self.prompts.deep is not None
            checker = None if deep_prompts else client.spot_checker
            if state.span.start == self._recheck_start:
                force_check, self._recheck_start = True, None
            checking = checker is not None and (force_check or checker.should_check())
            deferred = (
                checking
                and self.defer_checks
                and not force_check
                and len(self._deferred) < MAX_DEFERRED_CHECKS
            )
            try:
                if checking and not deferred:
                    servers = client.usable_servers()
                    output, check = client.run_async(
                        self._step_and_check(state, hidden, position, mask, position_ids, servers)
                    )
                else:
                    prompts = self._deep_prompts(state.span, position)
                    step = state.stream.step(
                        hidden, position, mask, position_ids, prompts, state.reorder, next(self._step_ids)
                    )
                    output = client.run_async(step)
            except Exception as e:
                failures = self._hop_failed(e, index, position, mask, failures, opinion)
                continue
            self._served(state, None, time.perf_counter() - started, opinion, hidden.shape)
            if deferred:
                self._defer_check(state, hidden, position, mask, position_ids, output)
            elif checking:
                force_check = not self._judge_check(state, check, output)
                if force_check:  # a dispute's winner is only right about the disputed operator: check again
                    failures = self._replace_span(index, mask, failures)  # re-routes, replays, runs it again
                    continue
            state.inputs.append(hidden)
            hidden = output
            index += 1
        self.position = position + hidden.shape[1]
        self._rewound = False
        self._position_ids = (
            position_ids if self._position_ids is None else torch.cat([self._position_ids, position_ids], 1)
        )
        if self.on_step is not None:
            self.on_step(self.position)
        return hidden

    def _served(
        self,
        state: _SpanState,
        hidden: torch.Tensor | None,
        seconds: float,
        opinion: SecondOpinion,
        shape: torch.Size | None = None,
    ) -> None:
        """Account for a span that served a step (its input `hidden` kept for replay, when given)."""
        opinion.served()
        state.reorder = None  # its node applied it
        span = state.span
        batch, new_tokens = (hidden.shape if hidden is not None else shape)[:2]
        self.client.record_hop(span.peer_id, batch * new_tokens * (span.end - span.start), seconds)
        if self.on_hop is not None:
            self.on_hop(span, new_tokens, seconds)
        if hidden is not None:
            state.inputs.append(hidden)

    def _hop_failed(
        self,
        error: Exception,
        index: int,
        position: int,
        mask: torch.Tensor | None,
        failures: int,
        opinion: SecondOpinion,
    ) -> int:
        """Replace the span that failed a step (re-route, replay); returns the failures so far, or raises the
        error when it was our own request or the retries are used up."""
        state = self._spans[index]
        culprit = blame(error)
        if culprit == "request":  # our own request, unless another node takes it
            excluded = opinion.refused(error, state.span)
            return self._replace_span(index, mask, failures, punish=None, exclude=excluded)
        failures += 1
        logger.warning(
            "node %s failed on blocks [%d, %d) at position %d: %r",
            state.span.peer_id,
            state.span.start,
            state.span.end,
            position,
            error,
        )
        if failures > self.client.config.max_retries:
            raise error
        return self._replace_span(index, mask, failures, punish=culprit, exclude=opinion.excluded)

    def _push_segment(self, index: int, position: int) -> list[_SpanState]:
        """The spans from `index` on that one step can pass through by push (at least two), or [] to drive
        this hop from the client. A stream opens with a step from the client (the node has no session to push
        to before), and pushes skip spot-checked steps, the first step (deep prompts), nodes behind relays
        (the previous node may not reach them), a node passed to itself, nodes that do not echo step ids
        (older versions, which do not push either), and a step that rewinds the caches (after truncate(), or
        a failed check)."""
        client = self.client
        if not client.config.push or position == 0 or self._rewound or client.spot_checker is not None:
            return []
        if self.num_push_errors >= MAX_PUSH_ERRORS:
            return []
        segment = [self._spans[index]]
        if not segment[0].stream.serving:
            return []
        for state in self._spans[index + 1 :]:
            stream, previous = state.stream, segment[-1]
            if not (stream.accept_push and stream.serving) or state.span.info.relay_maddrs:
                break
            if state.span.peer_id == previous.span.peer_id or not previous.stream.echoes_step_ids:
                break
            segment.append(state)
        return segment if len(segment) > 1 else []

    async def _push_step(
        self,
        segment: list[_SpanState],
        hidden: torch.Tensor,
        position: int,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
    ) -> tuple[list[tuple[torch.Tensor, float]], Exception | None]:
        """Send a step to the segment's first node, which pushes it along the rest; wait for every span's
        output in turn. Returns (output, seconds since the previous one) of the spans that served it, and
        what stopped the rest (None: all served)."""
        step_id = next(self._step_ids)
        targets = []
        for state in segment[1:]:
            target = swarm_pb2.PushTarget(peer_id=state.span.peer_id, session_id=state.stream.session_id)
            if state.reorder is not None:
                target.hypo_ids.CopyFrom(serialize(state.reorder))
            targets.append(target)
        first = segment[0]
        served: list[tuple[torch.Tensor, float]] = []
        last = time.perf_counter()
        request = first.stream.request(
            hidden, position, mask, position_ids, hypo_ids=first.reorder, step_id=step_id, push_to=targets
        )
        try:
            await first.stream.send(request)
            served.append((await first.stream.receive(step_id, position, hidden.shape), 0.0))
        except Exception as e:
            return served, e
        served[0] = (served[0][0], time.perf_counter() - last)
        last = time.perf_counter()
        for index, (previous, state) in enumerate(zip(segment, segment[1:], strict=False)):
            output = asyncio.ensure_future(state.stream.receive(step_id, position, hidden.shape))
            failed = asyncio.ensure_future(previous.stream.push_failure(step_id))
            try:
                await asyncio.wait({output, failed}, return_when=asyncio.FIRST_COMPLETED)
                if not output.done():  # the previous node could not push it: send it there from here
                    error = failed.result()
                    self.num_push_errors += 1
                    logger.info(
                        "%s could not push step %d to %s (%s: %s); sending it there",
                        previous.span.peer_id,
                        step_id,
                        state.span.peer_id,
                        swarm_pb2.Error.Code.Name(error.code),
                        error.message,
                    )
                    # the same step id: the reply is the one already awaited, and the node's liveness is
                    # judged from when the step was pushed
                    direct = state.stream.request(
                        served[-1][0],
                        position,
                        mask,
                        position_ids,
                        hypo_ids=state.reorder,
                        step_id=step_id,
                        push_to=targets[index + 1 :],
                    )
                    await state.stream.send(direct)
                    await asyncio.wait({output})
            except Exception as e:  # the stream could not take the request
                return served, e
            finally:
                for pending in (output, failed):
                    if not pending.done():
                        pending.cancel()
            try:
                served.append((output.result(), time.perf_counter() - last))
            except Exception as e:
                return served, e
            last = time.perf_counter()
        return served, None

    async def _step_and_check(
        self,
        state: _SpanState,
        hidden: torch.Tensor,
        position: int,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        servers: list[swarm_pb2.ServerInfo],
    ) -> tuple[torch.Tensor, SpotCheck]:
        """The step, and at the same time a spot check of the span on the whole input so far: the check needs
        only the inputs, so the user waits for the slower of the two rather than for both in turn.

        The committed forward recomputes the prefix without a cache, so it matches the session's output only
        within a tolerance; a node that lies in its sessions by less than that is not caught here.
        """
        check = asyncio.ensure_future(self._check(state, hidden, mask, position_ids, servers))
        try:
            output = await state.stream.step(hidden, position, mask, position_ids, hypo_ids=state.reorder)
        except BaseException:
            check.cancel()  # the node failed the step: it is replaced, and its replacement checked
            check.add_done_callback(lambda done: done.cancelled() or done.exception())  # nobody awaits it
            raise
        return output, await check

    def _defer_check(
        self,
        state: _SpanState,
        hidden: torch.Tensor,
        position: int,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        output: torch.Tensor,
    ) -> None:
        check = self._check(state, hidden, mask, position_ids, self.client.usable_servers())
        self._deferred.append(_DeferredCheck(self.client.submit_async(check), state, position, output))

    def _check(
        self,
        state: _SpanState,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        servers: list[swarm_pb2.ServerInfo],
    ) -> Coroutine[Any, Any, SpotCheck]:
        """A spot check of the span's step on `hidden`: its whole input so far, committed by two nodes."""
        history = torch.cat([*state.inputs, hidden], dim=1)
        positions = (
            position_ids if self._position_ids is None else torch.cat([self._position_ids, position_ids], 1)
        )
        span = state.span
        return self.client.spot_checker.check(
            span.info, span.start, span.end, history, mask, positions, servers
        )

    def settle_checks(self, backlog: int = 0) -> int | None:
        """Judge the deferred spot checks in step order: those that are done, and the oldest ones until at
        most `backlog` are left running. On the first that failed, ban its node, rewind the session to the
        step it checked (the nodes' caches are overwritten from there, the failed span is replayed
        elsewhere) and return that position in the caller's tokens (`num_tokens` after the rewind); the
        caller must drop whatever it computed from later steps. None: every check judged held up."""
        timeout = self.client.config.request_timeout * 3
        while self._deferred:
            pending = self._deferred[0]
            if len(self._deferred) <= backlog and not pending.future.done():
                return None
            self._deferred.pop(0)
            try:
                result = pending.future.result(timeout)
            except Exception as e:  # a check that could not run proves nothing either way
                logger.warning("a spot check of %s could not finish: %r", pending.state.span.peer_id, e)
                continue
            if not self._judge_check(pending.state, result, pending.output):
                self._rewind(pending)
                return self.num_tokens
        return None

    def _rewind(self, failed: _DeferredCheck) -> None:
        for later in self._deferred:
            later.future.cancel()
        self._deferred.clear()
        position = failed.position
        for state in self._spans:
            kept = torch.cat(state.inputs, dim=1)[:, :position] if state.inputs else None
            state.inputs = [kept] if kept is not None and kept.shape[1] else []
        self._position_ids = None if position == 0 else self._position_ids[:, :position]
        self.position = position
        self._rewound = True
        self.num_rewinds += 1
        logger.warning(
            "rewinding the session to position %d: a spot check of %s failed", position, failed.state.span
        )
        index = next((i for i, state in enumerate(self._spans) if state is failed.state), None)
        if index is not None:  # still on the route: replace it (the others overwrite their caches)
            self._replace_span(index, self._mask, 0)
        self._recheck_start = failed.state.span.start  # its replacement's next step is checked at once

    def _judge_check(self, state: _SpanState, result: SpotCheck, output: torch.Tensor) -> bool:
        """Record a spot check of the span's step; False when its node was convicted or answered the session
        otherwise than its committed forward."""
        client, span = self.client, state.span
        self.spot_checks.append(result)
        client.convict(result.convicted)
        if span.peer_id in result.convicted:
            return False
        if not result.served_matches(output):
            logger.warning(
                "node %s answered blocks [%d, %d) otherwise than its committed forward",
                span.peer_id,
                span.start,
                span.end,
            )
            return False
        return True

    def _open_chain(self, route: list[RemoteSpan]) -> list[_SpanState]:
        timeout = self.client.config.request_timeout
        # one id per span and attempt: a route may pass a node twice, or a replacement land on a node
        # already in the chain, and a node keeps one session per id
        return [
            _SpanState(
                span,
                SpanStream(
                    self.client.p2p,
                    span,
                    f"{self.session_id}.{next(self._streams_opened)}",
                    self.max_length + self.prefix_length,
                    timeout,
                    self.client.config.liveness_period,
                    accept_push=self.client.config.push,
                ),
            )
            for span in route
        ]

    def _replace_span(
        self,
        index: int,
        mask: torch.Tensor | None,
        failures: int,
        punish: str | None = "node",
        exclude: frozenset[str] = frozenset(),
    ) -> int:
        """Ban the failed node (`punish` "node"; "busy": skip it for a moment; None: neither), route its
        blocks through others (none in `exclude`) and replay its inputs there. Each failed replay counts
        towards max_retries; returns the failures."""
        failed = self._spans[index]
        if punish == "node":
            self.client.ban(failed.span.peer_id)
        elif punish == "busy":
            self.client.bans.cool_down(failed.span.peer_id, BUSY_COOL_DOWN)
        self.client.run_async(failed.stream.close())
        self.num_recoveries += 1
        self.num_push_errors = 0  # a push to a node that failed is not push's fault
        while True:
            route = self._route_like(failed.span, exclude)
            replacement = self._open_chain(route)
            if not failed.inputs:
                break
            try:
                self._replay(replacement, torch.cat(failed.inputs, dim=1), mask)
                break
            except Exception as e:
                for state in replacement:
                    self.client.run_async(state.stream.close())
                if blame(e) == "request":
                    raise RequestRefused(e) from e
                failures += 1
                logger.warning("replay on a replacement chain failed (failure %d): %r", failures, e)
                if failures > self.client.config.max_retries:
                    raise
        logger.info(
            "blocks [%d, %d) moved from %s to %s; replayed %d tokens",
            failed.span.start,
            failed.span.end,
            failed.span.peer_id,
            [state.span.peer_id for state in replacement],
            self.position,
        )
        self._spans[index : index + 1] = replacement
        return failures

    def _route_like(self, lost: RemoteSpan, exclude: frozenset[str]) -> list[RemoteSpan]:
        """A new route for a lost span, through nodes of the lost node's --quant where there are any, so
        the session's text stays what those weights give; else through any allowed ones."""
        quant = quant_of(lost.info)
        try:
            return self.client.find_route(lost.start, lost.end, exclude=exclude, quant=quant, wait=False)
        except MissingBlocksError:
            logger.warning(
                "no other node with --quant %s serves blocks [%d, %d): re-routing through any allowed quant",
                quant,
                lost.start,
                lost.end,
            )
        return self.client.find_route(lost.start, lost.end, exclude=exclude)

    def _replay(self, chain: list[_SpanState], history: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Rebuild the caches of a new chain from a span's past inputs, in chunks."""
        position_ids = self._position_ids
        full_mask = None if mask is None else mask[:, : self.position]
        chunk = self._chunk_tokens(history.shape[0] * history.shape[2] * history.element_size())
        for state in chain:
            outputs = []
            for offset in range(0, history.shape[1], chunk):
                end = min(history.shape[1], offset + chunk)
                part = history[:, offset:end]
                step_mask = None if full_mask is None else full_mask[:, :end]
                try:
                    prompts = self._deep_prompts(state.span, offset)
                    step = state.stream.step(
                        part,
                        offset,
                        step_mask,
                        position_ids[:, offset:end],
                        prompts,
                        None,
                        next(self._step_ids),
                    )
                    out = self.client.run_async(step)
                except Exception:
                    self.client.ban(state.span.peer_id)
                    raise
                state.inputs.append(part)
                outputs.append(out)
            history = torch.cat(outputs, dim=1)

    def close(self) -> None:
        """Free the session's caches on every node of the route."""
        if self._closed:
            return
        self._closed = True
        for pending in self._deferred:
            pending.future.cancel()
        self._deferred.clear()
        for state in self._spans:
            try:
                self.client.run_async(state.stream.close())
            except Exception as e:
                logger.debug("closing %s: %r", state.span, e)
        self._spans = []

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
