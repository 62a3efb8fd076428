"""Typed hivemind P2P handlers of a node. Every failure becomes an Error reply; the node keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import AsyncIterator  # noqa: UP035 (hivemind recognises streams by typing.AsyncIterator only)

import torch
from hivemind.p2p import P2P, P2PContext

from swarm.node.admission import Admission, BufferedBytes
from swarm.node.backend import SpanBackend, SpanInputs
from swarm.node.errors import RequestError, error_reply
from swarm.node.metrics import NodeMetrics
from swarm.node.push import PushedStep, StepInbox, push_step
from swarm.node.sessions import Session, check_step_shapes, parse_hypo_ids
from swarm.proto import swarm_pb2
from swarm.protocol import MAX_UNARY_MESSAGE_BYTES, STREAM_CHUNK_BYTES, NodeProtocol
from swarm.utils.streaming import combine_parts, hold_until_caller_closes, split_tensors
from swarm.utils.tensors import serialize

logger = logging.getLogger(__name__)

# bounded so a peer can't keep a stream open forever by trickling parts
MAX_STREAM_MESSAGES = 4096
MAX_SESSION_ID_LENGTH = 128
OFF_LOOP_BYTES = 1 << 20  # requests with more tensor bytes than this are decoded on a worker thread
# after these the session's state is unknown (a step may still be running), it never got a cache, or
# the node moved off its blocks (ending the session lets the old span's weights go)
FATAL_SESSION_ERRORS = (swarm_pb2.Error.TIMEOUT, swarm_pb2.Error.OVERLOADED, swarm_pb2.Error.UNKNOWN_BLOCKS)


def _repeated_step(
    session: Session, request: swarm_pb2.InferenceRequest
) -> swarm_pb2.InferenceResponse | None:
    """The reply already given to this very step (same id, same position, nothing run since), or None.

    A client resends a step under its id when the previous node says its push failed; the push may have
    reached this node all the same (only its answer was lost), and running the step twice would reorder a
    beam's cache twice."""
    if not request.step_id or session.last_step is None:
        return None
    step_id, position, length_after, reply = session.last_step
    if (step_id, position, length_after) == (request.step_id, request.position, session.length):
        return reply
    return None


class NodeServicer(NodeProtocol):
    """The node's side of NodeProtocol, over its span backend."""

    def __init__(
        self,
        backend: SpanBackend,
        get_server_info: Callable[[], swarm_pb2.ServerInfo],
        model_info: swarm_pb2.ModelInfo,
        get_stage_info: Callable[[], swarm_pb2.StageInfo] | None = None,
    ):
        self.backend, self.get_server_info, self.model_info = backend, get_server_info, model_info
        # per node, not per backend: the caps hold across a move to other blocks
        self.admission = Admission(backend.limits)
        self.get_stage_info = get_stage_info  # training nodes: their stage record
        # training nodes: why a peer may not call forward/backward (e.g. banned from the run), or None
        self.refuse_peer: Callable[[str], str | None] | None = None
        # training nodes: sign(kind, inputs, first output) -> a receipt for the reply, which shows that
        # this node returned it (trainers keep them for validators: swarm.training.validation)
        self.sign_reply: Callable[[str, SpanInputs, torch.Tensor], bytes] | None = None
        # served over HTTP with --metrics-port; counted either way (a few dictionary lookups a request)
        self.metrics = NodeMetrics(lambda: self.backend.sessions)
        self.p2p: P2P | None = None  # the node's own, to push steps to the next node of a chain

    def _check_caller(self, context: P2PContext) -> None:
        reason = self.refuse_peer(context.remote_id.to_base58()) if self.refuse_peer is not None else None
        if reason is not None:
            raise RequestError(swarm_pb2.Error.FORBIDDEN, reason)

    async def rpc_info(self, request: swarm_pb2.InfoRequest, context: P2PContext) -> swarm_pb2.InfoResponse:
        response = swarm_pb2.InfoResponse(
            server=self.get_server_info(), limits=self.backend.limits.to_proto(), model=self.model_info
        )
        if self.get_stage_info is not None:
            response.stage.CopyFrom(self.get_stage_info())
        return response

    async def rpc_forward(
        self, request: swarm_pb2.ForwardRequest, context: P2PContext
    ) -> swarm_pb2.ForwardResponse:
        return await self._unary(request, context, "forward", swarm_pb2.ForwardResponse)

    async def rpc_forward_stream(
        self, requests: AsyncIterator[swarm_pb2.ForwardRequest], context: P2PContext
    ) -> AsyncIterator[swarm_pb2.ForwardResponse]:
        async for reply in self._streamed(requests, context, "forward", swarm_pb2.ForwardResponse):
            yield reply

    async def rpc_backward(
        self, request: swarm_pb2.BackwardRequest, context: P2PContext
    ) -> swarm_pb2.BackwardResponse:
        return await self._unary(request, context, "backward", swarm_pb2.BackwardResponse)

    async def rpc_backward_stream(
        self, requests: AsyncIterator[swarm_pb2.BackwardRequest], context: P2PContext
    ) -> AsyncIterator[swarm_pb2.BackwardResponse]:
        async for reply in self._streamed(requests, context, "backward", swarm_pb2.BackwardResponse):
            yield reply

    async def _unary(self, request, context: P2PContext, kind: str, response_type):
        """A forward or backward call in one message; the reply must fit one message too."""
        with self.metrics.request(kind) as outcome:
            reply = await self._unary_reply(request, context, kind, response_type)
            if reply.HasField("error"):
                outcome["outcome"] = swarm_pb2.Error.Code.Name(reply.error.code)
            return reply

    async def _unary_reply(self, request, context: P2PContext, kind: str, response_type):
        started = time.perf_counter()
        try:
            self._check_caller(context)
            outputs, step, receipt = await self._run_span(
                request, list(request.tensors), context, backward=kind == "backward"
            )
            response = response_type(tensors=[serialize(t) for t in outputs], step=step, receipt=receipt)
            if response.ByteSize() > MAX_UNARY_MESSAGE_BYTES:
                raise RequestError(
                    swarm_pb2.Error.TOO_LARGE,
                    f"response exceeds the unary message limit; use rpc_{kind}_stream",
                )
            return response
        except Exception as e:
            return self._error_reply(response_type, e, context, kind)
        finally:
            logger.debug("rpc_%s took %.1f ms", kind, 1000 * (time.perf_counter() - started))

    async def _streamed(self, requests: AsyncIterator, context: P2PContext, kind: str, response_type):
        """A forward or backward call whose request and reply come in parts of at most 1 MiB."""
        with self.metrics.request(f"{kind}_stream") as outcome:
            async for reply in self._streamed_replies(requests, context, kind, response_type):
                if reply.HasField("error"):
                    outcome["outcome"] = swarm_pb2.Error.Code.Name(reply.error.code)
                yield reply
        await hold_until_caller_closes()

    async def _streamed_replies(self, requests: AsyncIterator, context: P2PContext, kind: str, response_type):
        try:
            with contextlib.ExitStack() as held:
                try:
                    held.enter_context(self.admission.stream(context.remote_id.to_base58()))
                except RequestError:
                    await self._drain(requests)  # replying mid-stream would reset the connection
                    raise
                buffered = held.enter_context(self.admission.buffer())
                first, parts = await self._receive_stream(requests, buffered)
                self._check_caller(context)  # after reading: replying mid-stream would reset the connection
                outputs, step, receipt = await self._run_span(
                    first, parts, context, backward=kind == "backward"
                )
                buffered.close()
                serialized = [serialize(t) for t in outputs]
            for index, part in enumerate(split_tensors(serialized, STREAM_CHUNK_BYTES)):
                yield response_type(tensors=[part], step=step, receipt=receipt if index == 0 else b"")
        except Exception as e:
            yield self._error_reply(response_type, e, context, f"{kind}_stream")

    async def _drain(self, requests: AsyncIterator) -> None:
        """Read and drop what a caller still sends after the reply that ends its stream, until it closes
        (bounded by the message count and timeout): closing first could reset the stream before the caller
        has read that reply."""
        timeout = self.backend.limits.stream_message_timeout
        iterator = aiter(requests)
        for _ in range(MAX_STREAM_MESSAGES):
            try:
                await asyncio.wait_for(anext(iterator), timeout)
            except (StopAsyncIteration, TimeoutError):
                return

    async def _run_span(
        self, request, tensors, context: P2PContext, backward: bool
    ) -> tuple[list, int, bytes]:
        """([outputs] of a forward, or [grad_inputs, (grad_prompts)] of a backward), the weights' step and
        the reply's receipt (b"" unless this node signs its replies)."""
        backend = self.backend  # the node may move to other blocks meanwhile
        parse = functools.partial(
            backend.parse_inputs,
            request.start_block,
            request.end_block,
            tensors,
            request.attention_mask if request.HasField("attention_mask") else None,
            request.position_ids if request.HasField("position_ids") else None,
            backward=backward,
        )
        if sum(len(t.buffer) for t in tensors) > OFF_LOOP_BYTES:
            inputs = await asyncio.to_thread(parse)  # decoding and checking megabytes: not on the event loop
        else:
            inputs = parse()
        inputs.caller = context.remote_id.to_base58()
        hidden = inputs.hidden_states
        self.metrics.tokens.labels("backward" if backward else "forward").inc(
            hidden.shape[0] * hidden.shape[1]
        )
        if backward:
            inputs.receipt = bytes(request.receipt)
            outputs = await backend.backward(inputs)
        else:
            outputs = [await backend.forward(inputs)]
        receipt = b""
        if self.sign_reply is not None:
            receipt = self.sign_reply("backward" if backward else "forward", inputs, outputs[0])
        return outputs, inputs.step, receipt

    async def _receive_stream(self, requests: AsyncIterator, buffered: BufferedBytes) -> tuple:
        first, parts, count, total = None, [], 0, 0
        limits = self.backend.limits
        limit = limits.max_request_bytes
        too_large = None
        iterator = aiter(requests)
        while True:
            try:
                message = await asyncio.wait_for(anext(iterator), limits.stream_message_timeout)
            except StopAsyncIteration:
                break
            except TimeoutError:
                # a peer that trickles (or stalls) holds a handler and its buffers: drop it
                raise RequestError(
                    swarm_pb2.Error.TIMEOUT,
                    f"no complete stream message within {limits.stream_message_timeout:g} s",
                ) from None
            count += 1
            if count > MAX_STREAM_MESSAGES:
                raise RequestError(
                    swarm_pb2.Error.TOO_LARGE, f"more than {MAX_STREAM_MESSAGES} stream messages"
                )
            first = first or message
            for part in message.tensors:
                total += len(part.buffer)
                if total > limit:
                    # keep reading (and dropping) the rest, bounded by the message count: replying
                    # while the client still writes would reset the connection and lose the reply
                    too_large = RequestError(
                        swarm_pb2.Error.TOO_LARGE, f"streamed request exceeds the limit of {limit} bytes"
                    )
                    parts.clear()
                if too_large is None:
                    try:
                        buffered.take(len(part.buffer))
                    except RequestError as e:  # the node's buffers are full: drop the rest as above
                        too_large = e
                        parts.clear()
                        buffered.close()
                    else:
                        parts.append(part)
        if too_large is not None:
            raise too_large
        if first is None:
            raise RequestError(swarm_pb2.Error.BAD_REQUEST, "empty request stream")
        return first, combine_parts(parts, limit)

    async def rpc_inference(
        self, requests: AsyncIterator[swarm_pb2.InferenceRequest], context: P2PContext
    ) -> AsyncIterator[swarm_pb2.InferenceResponse]:
        """One inference session per stream: every request gets one reply, in order.

        The first request opens the session (id, blocks, max_length). A step whose input is bad gets an
        error reply and changes nothing; the session stays usable. The cache is freed when the client
        sends `close`, ends or drops the stream, or stays idle for the session timeout.
        """
        session: Session | None = None
        backend = self.backend  # a session stays with the span it opened on, even if the node moves
        sessions = backend.sessions
        idle_timeout = backend.limits.session_timeout
        inbox = StepInbox(requests)  # the client's requests, and steps pushed to the session (rpc_push)
        held = contextlib.ExitStack()
        pushes: set[asyncio.Future] = set()  # this session's outputs on their way to the next node
        try:
            while True:
                # a stream that does not even open its session within the message timeout is dropped
                # (it holds no session slot to count against the caps meanwhile)
                wait = idle_timeout if session is not None else backend.limits.stream_message_timeout
                try:
                    item = await inbox.next(wait)
                except TimeoutError:
                    error = swarm_pb2.Error(
                        code=swarm_pb2.Error.TIMEOUT,
                        message=f"session idle for over {wait:g} s; closed"
                        if session is not None
                        else f"no complete stream message within {wait:g} s",
                    )
                    yield swarm_pb2.InferenceResponse(error=error)
                    break
                if item is None:
                    break
                if isinstance(item, swarm_pb2.InferenceResponse):  # a failed push: the client sends it on
                    yield item
                    continue
                pushed = isinstance(item, PushedStep)
                request = item.request if pushed else item
                if session is None:
                    try:
                        held.enter_context(self.admission.session(context.remote_id.to_base58()))
                        session = self._open_session(backend, request, context)
                    except Exception as e:
                        yield self._error_reply(swarm_pb2.InferenceResponse, e, context, "inference")
                        held.close()
                        await inbox.drain(backend.limits.stream_message_timeout, MAX_STREAM_MESSAGES)
                        break
                    if request.accept_push:
                        session.inbox = inbox
                if request.close:
                    break
                session.last_active = time.monotonic()
                with self.metrics.request("inference_step") as outcome:
                    try:
                        if pushed and request.position != session.length:  # the client went on without it
                            raise RequestError(
                                swarm_pb2.Error.BAD_REQUEST,
                                f"pushed step at position {request.position} is stale: "
                                f"the session holds {session.length} tokens",
                            )
                        repeated = _repeated_step(session, request)
                        if repeated is not None:
                            yield repeated
                            continue
                        parsed = item.parsed if pushed else None
                        outputs = await self._inference_step(backend, session, request, parsed)
                        output = serialize(outputs)
                        reply = swarm_pb2.InferenceResponse(
                            tensors=[output], position=session.length, step_id=request.step_id
                        )
                        # only a pushed step can come again (from its client): keep no other reply's bytes
                        session.last_step = (
                            (request.step_id, request.position, session.length, reply) if pushed else None
                        )
                        if request.push_to:  # started before the reply goes out: the next node waits for it
                            push = asyncio.ensure_future(self._push(session, request, output, inbox))
                            pushes.add(push)
                            push.add_done_callback(pushes.discard)
                    except Exception as e:
                        reply = self._error_reply(swarm_pb2.InferenceResponse, e, context, "inference")
                        reply.position, reply.step_id = session.length, request.step_id
                        outcome["outcome"] = swarm_pb2.Error.Code.Name(reply.error.code)
                yield reply
                if reply.HasField("error"):
                    if reply.error.code in FATAL_SESSION_ERRORS:
                        sessions.release(session)
                        held.close()
                        await inbox.drain(backend.limits.stream_message_timeout, MAX_STREAM_MESSAGES)
                        break
        finally:
            for push in list(pushes):
                push.cancel()
            inbox.close()
            if session is not None:
                session.inbox = None
                sessions.release(session)
            held.close()

    async def _push(
        self, session: Session, request: swarm_pb2.InferenceRequest, output, inbox: StepInbox
    ) -> None:
        """Push a step's output to the next node; if it does not take it, the session's stream tells the
        client (without holding up the session's next steps meanwhile)."""
        if self.p2p is None:
            error = swarm_pb2.Error(code=swarm_pb2.Error.BAD_REQUEST, message="this node does not push steps")
        else:
            error = await push_step(self.p2p, session.owner, request, output)
        if error is not None:
            logger.info("push of session %s's step to the next node failed: %s", session.session_id, error)
            inbox.notify(
                swarm_pb2.InferenceResponse(
                    position=session.length, step_id=request.step_id, push_error=error
                )
            )

    async def rpc_push(self, request: swarm_pb2.PushRequest, context: P2PContext) -> swarm_pb2.PushResponse:
        """Queue a step the previous node of a chain pushed into one of this node's sessions. The session must
        have been opened with accept_push by `request.owner`, and the step must continue it where it stands;
        it is checked here as a client's would be, and anything else is refused (the pusher tells the client,
        which sends the step itself). Its session id is the capability: only the client and the nodes of its
        chain know it."""
        try:
            step = request.step
            session = self.backend.sessions.find(request.owner, step.session_id)
            inbox = None if session is None else session.inbox
            if inbox is None or session.closed:
                raise RequestError(
                    swarm_pb2.Error.UNKNOWN_SESSION,
                    f"no session {step.session_id[:MAX_SESSION_ID_LENGTH]!r} of {request.owner[:64]!r} "
                    "takes pushed steps here",
                )
            if (
                step.close
                or step.accept_push
                or step.HasField("prompts")
                or step.start_block
                or step.end_block
            ):
                raise RequestError(swarm_pb2.Error.BAD_REQUEST, "a pushed step carries a step's tensors only")
            if session.computing or inbox.has_pushed or step.position != session.length:
                raise RequestError(
                    swarm_pb2.Error.BAD_REQUEST,
                    f"pushed step at position {step.position} does not continue the session "
                    f"({session.length} tokens{', a step running' if session.computing else ''})",
                )
            parsed = await self._parse_step(self.backend, session, step)
            inbox.push(PushedStep(step, parsed))
            return swarm_pb2.PushResponse()
        except Exception as e:
            return self._error_reply(swarm_pb2.PushResponse, e, context, "push")

    def _open_session(
        self, backend: SpanBackend, request: swarm_pb2.InferenceRequest, context: P2PContext
    ) -> Session:
        backend.check_inference()
        layers = backend.check_blocks(request.start_block, request.end_block)
        if not 0 < len(request.session_id) <= MAX_SESSION_ID_LENGTH:
            raise RequestError(
                swarm_pb2.Error.BAD_REQUEST, f"session_id must have 1 to {MAX_SESSION_ID_LENGTH} characters"
            )
        max_length = backend.limits.max_sequence_length
        if not 0 < request.max_length <= max_length:
            raise RequestError(
                swarm_pb2.Error.TOO_LARGE if request.max_length else swarm_pb2.Error.BAD_REQUEST,
                f"max_length must be in [1, {max_length}], got {request.max_length}",
            )
        session = Session(
            request.session_id,
            request.start_block,
            request.end_block,
            layers,
            request.max_length,
            owner=context.remote_id.to_base58(),
        )
        backend.sessions.register(session)
        return session

    async def _inference_step(
        self, backend: SpanBackend, session: Session, request: swarm_pb2.InferenceRequest, parsed=None
    ):
        """Run one step of the session (`parsed`: its inputs, when already checked on arrival)."""
        if parsed is None:
            parsed = await self._parse_step(backend, session, request)
        hidden, mask, positions, prompts, hypo_ids = parsed
        if not session.batch_size:
            backend.reserve_cache(session, hidden.shape[0])
        inputs = SpanInputs(hidden, mask, positions, session.layers, hidden.dtype, prompts, hypo_ids=hypo_ids)
        outputs = await backend.inference_step(session, request.position, inputs)
        self.metrics.tokens.labels("inference").inc(hidden.shape[0] * hidden.shape[1])
        return outputs

    async def _parse_step(self, backend: SpanBackend, session: Session, request: swarm_pb2.InferenceRequest):
        """A step's (hidden, mask, positions, prompts, hypo_ids), checked against the session."""
        if (request.start_block, request.end_block) not in ((0, 0), (session.start, session.end)):
            raise RequestError(
                swarm_pb2.Error.BAD_REQUEST,
                f"session serves blocks [{session.start}, {session.end}), "
                f"not [{request.start_block}, {request.end_block})",
            )

        def parse():
            hidden = backend.parse_hidden(request.tensors)
            mask = backend.parse_index_tensor(
                request.attention_mask if request.HasField("attention_mask") else None, "attention_mask"
            )
            positions = backend.parse_index_tensor(
                request.position_ids if request.HasField("position_ids") else None, "position_ids"
            )
            check_step_shapes(session, request.position, hidden, mask, positions)
            prompts = None
            if request.HasField("prompts"):
                if request.position != 0:
                    raise RequestError(
                        swarm_pb2.Error.BAD_REQUEST,
                        f"deep prompts go with the step at position 0, not {request.position}",
                    )
                num_layers = session.end - session.start
                prompts = backend.parse_prompts(request.prompts, num_layers, *hidden.shape[:2])
            hypo_ids = None
            if request.HasField("hypo_ids"):
                limit = backend.limits.max_request_bytes
                hypo_ids = parse_hypo_ids(request.hypo_ids, request.position, hidden.shape[0], limit)
            return hidden, mask, positions, prompts, hypo_ids

        # a long prompt's step carries megabytes: decode it on a worker thread, off the event loop
        large = sum(len(t.buffer) for t in request.tensors) > OFF_LOOP_BYTES
        return await asyncio.to_thread(parse) if large else parse()

    def _error_reply(self, response_type, exc: BaseException, context: P2PContext, what: str):
        reply = error_reply(response_type, exc, context, what, logger)
        self.metrics.errors.labels(swarm_pb2.Error.Code.Name(reply.error.code)).inc()
        return reply
