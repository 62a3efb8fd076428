"""The node's span of blocks: request checks and the compute thread that runs them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from swarm.models.span import BlockSpan
from swarm.node.batched_decode import can_batch, decode_sessions
from swarm.node.compute import INFERENCE, SERVE, Batchable, ComputeThread
from swarm.node.errors import RequestError
from swarm.node.kv_cache import SpanCache, kv_bytes_per_token
from swarm.node.limits import NodeLimits
from swarm.node.sessions import Session, SessionBudget
from swarm.proto import swarm_pb2
from swarm.utils.tensors import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    TensorTooLargeError,
    check_finite,
    deserialize_checked,
)

logger = logging.getLogger(__name__)


def _tokens(inputs: SpanInputs) -> int:
    return inputs.hidden_states.shape[0] * inputs.hidden_states.shape[1]


# decode steps up to this many tokens (batch x new tokens) may run on the event loop's thread when the
# compute thread is idle (SpanBackend.inference_step); larger ones always go to the compute thread
INLINE_STEP_TOKENS = 8
# ... and only while such steps take less than this (the last one measured): the event loop answers every
# other call of the node, and a big span's decode step would hold them all up
INLINE_STEP_SECONDS = 0.005
# with --batch-decode, a decode step waits to be batched only if another session sent one this recently;
# a lone active session (however many idle ones are open) keeps the inline path
BATCH_PEER_WINDOW = 1.0
# ... and a batch waits for the steps of the other active sessions (their clients are answering the last
# batch) for at most this share of the last batch's compute time, and never longer than BATCH_GATHER_MAX:
# without it, N clients settle into two half-batches that each read all the weights
BATCH_GATHER_SHARE = 0.5
BATCH_GATHER_MAX = 0.05


@dataclass
class SpanInputs:
    """A checked request: hidden states plus optional mask and positions, and the layers to run."""

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    layers: slice
    wire_dtype: torch.dtype
    prompts: torch.Tensor | None = None  # deep prompts (layers, batch or 1, prefix, hidden)
    grad_outputs: torch.Tensor | None = None  # for backward: d(loss)/d(outputs)
    step: int = 0  # set by trainable backends: the optimizer step of the weights that ran this request
    caller: str = ""  # the calling peer's id
    receipt: bytes = b""  # backward calls in training runs: the caller's signed receipt for the tensors
    hypo_ids: torch.Tensor | None = None  # inference: the cache rows to keep, in order, before the step


class SpanBackend:
    """Owns the span module; all tensor work runs on one compute thread, off the event loop."""

    def __init__(self, span: BlockSpan, limits: NodeLimits, device: str, dtype: torch.dtype):
        self.span, self.limits, self.device, self.dtype = span, limits, device, dtype
        self.hidden_size = span.config.hidden_size
        self.executor = ComputeThread()
        # the budget in bytes: --cache-tokens tokens over the whole span, in the dtype the cache is kept in
        self.sessions = SessionBudget(limits.cache_tokens, self.kv_bytes_per_token(len(span.layers)))
        self.retired: str | None = None  # why this span takes no more work (the node moved), if it doesn't
        self.small_step_seconds = float("inf")  # the last decode step's compute time: unknown until one ran
        self.decode_batch = limits.decode_batch if can_batch(span) else 1
        self.batched_steps = 0  # decode steps that ran in a batch of two or more (--batch-decode)
        # id(session) -> (the session, when its last one-token step came)
        self._decode_seen: dict[int, tuple[Session, float]] = {}
        self.batch_seconds = 0.0  # the last batched decode call's compute time (the gathering wait's scale)

    @property
    def start(self) -> int:
        return self.span.start

    @property
    def end(self) -> int:
        return self.span.end

    def kv_bytes_per_token(self, num_layers: int) -> int:
        """KV-cache bytes of one token of one sequence over `num_layers` of this span's layers."""
        return kv_bytes_per_token(self.span.config, num_layers, self.dtype)

    def reserve_cache(self, session: Session, batch_size: int) -> None:
        """Count the session's preallocated cache against the budget (OVERLOADED if it does not fit)."""
        layers = session.layers.stop - session.layers.start
        self.sessions.reserve(session, batch_size, self.kv_bytes_per_token(layers))

    def check_inference(self) -> None:
        """Refuse inference sessions if this backend can't serve them (trainable spans can't)."""

    def check_blocks(self, start: int, end: int) -> slice:
        """The local layer slice for blocks [start, end), which must lie inside this node's span."""
        if not (self.start <= start < end <= self.end):
            raise RequestError(
                swarm_pb2.Error.UNKNOWN_BLOCKS,
                f"blocks [{start}, {end}) are not served here; this node serves [{self.start}, {self.end})",
            )
        return slice(start - self.start, end - self.start)

    def parse_hidden(self, tensors, name: str = "hidden_states") -> torch.Tensor:
        """The one hidden-states tensor of a request, checked against the model and the limits."""
        if len(tensors) != 1:
            raise RequestError(swarm_pb2.Error.BAD_REQUEST, f"expected 1 tensor ({name}), got {len(tensors)}")
        hidden = deserialize_checked(
            tensors[0],
            name=name,
            allowed_dtypes=FLOAT_DTYPES,
            ndim=3,
            max_bytes=self.limits.max_request_bytes,
        )
        batch, seq_len, hidden_size = hidden.shape
        if hidden_size != self.hidden_size:
            raise RequestError(
                swarm_pb2.Error.BAD_REQUEST,
                f"hidden size {hidden_size} does not match the model's {self.hidden_size}",
            )
        if batch == 0 or seq_len == 0:
            raise RequestError(
                swarm_pb2.Error.BAD_REQUEST, f"empty hidden states of shape {tuple(hidden.shape)}"
            )
        if batch > self.limits.max_batch_size:
            raise TensorTooLargeError(f"batch {batch} exceeds the limit of {self.limits.max_batch_size}")
        if seq_len > self.limits.max_sequence_length:
            raise TensorTooLargeError(
                f"sequence length {seq_len} exceeds the limit of {self.limits.max_sequence_length}"
            )
        check_finite(hidden, name)
        return hidden

    def parse_inputs(
        self, start: int, end: int, tensors, attention_mask, position_ids, backward: bool = False
    ) -> SpanInputs:
        """Decode and check a forward request ([hidden, (prompts)]) or a backward one
        ([hidden, grad_outputs, (prompts)]); raises RequestError / BadTensorError."""
        layers = self.check_blocks(start, end)
        tensors = list(tensors)
        expected = (2, 3) if backward else (1, 2)
        if len(tensors) not in expected:
            what = "hidden, grad_outputs[, prompts]" if backward else "hidden[, prompts]"
            raise RequestError(
                swarm_pb2.Error.BAD_REQUEST, f"expected tensors [{what}], got {len(tensors)} tensors"
            )
        hidden = self.parse_hidden(tensors[:1])
        batch, seq_len, _ = hidden.shape
        grad_outputs = None
        if backward:
            grad_outputs = self.parse_hidden(tensors[1:2], "grad_outputs")
            if grad_outputs.shape != hidden.shape:
                raise RequestError(
                    swarm_pb2.Error.BAD_REQUEST,
                    f"grad_outputs has shape {tuple(grad_outputs.shape)}, expected {tuple(hidden.shape)}",
                )
        prompts = None
        if len(tensors) == expected[1]:
            prompts = self.parse_prompts(tensors[-1], end - start, batch, seq_len)
        mask = self.parse_index_tensor(attention_mask, "attention_mask")
        positions = self.parse_index_tensor(position_ids, "position_ids")
        for name, tensor in (("attention_mask", mask), ("position_ids", positions)):
            if tensor is not None and tuple(tensor.shape) != (batch, seq_len):
                raise RequestError(
                    swarm_pb2.Error.BAD_REQUEST,
                    f"{name} has shape {tuple(tensor.shape)}, expected {(batch, seq_len)}",
                )
        return SpanInputs(hidden, mask, positions, layers, hidden.dtype, prompts, grad_outputs)

    def parse_prompts(self, proto, num_layers: int, batch: int, seq_len: int) -> torch.Tensor:
        """Deep prompts (num_layers, 1 or batch, prefix <= seq_len, hidden); raises RequestError."""
        prompts = deserialize_checked(
            proto,
            name="prompts",
            allowed_dtypes=FLOAT_DTYPES,
            ndim=4,
            max_bytes=self.limits.max_request_bytes,
        )
        layers, prompt_batch, prefix, hidden_size = prompts.shape
        if layers != num_layers or prompt_batch not in (1, batch) or not 0 < prefix <= seq_len:
            raise RequestError(
                swarm_pb2.Error.BAD_REQUEST,
                f"prompts have shape {tuple(prompts.shape)}; expected ({num_layers}, 1 or {batch}, "
                f"1..{seq_len}, {self.hidden_size})",
            )
        if hidden_size != self.hidden_size:
            raise RequestError(
                swarm_pb2.Error.BAD_REQUEST,
                f"prompt size {hidden_size} does not match the model's {self.hidden_size}",
            )
        check_finite(prompts, "prompts")
        return prompts

    def parse_index_tensor(self, proto, name: str) -> torch.Tensor | None:
        """An optional 2D integer tensor (mask or positions); positions must be non-negative."""
        if proto is None or not proto.ListFields():
            return None
        tensor = deserialize_checked(
            proto, name=name, allowed_dtypes=INDEX_DTYPES, ndim=2, max_bytes=self.limits.max_request_bytes
        ).long()
        if (tensor < 0).any():
            raise RequestError(swarm_pb2.Error.BAD_REQUEST, f"{name} must be non-negative")
        return tensor

    def _call_span(self, inputs: SpanInputs, hidden, prompts=None, cache=None) -> torch.Tensor:
        """The span on `hidden` (already on the device) with the request's mask, positions and layers."""
        mask = inputs.attention_mask.to(self.device) if inputs.attention_mask is not None else None
        positions = inputs.position_ids.to(self.device) if inputs.position_ids is not None else None
        return self.span(
            hidden,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            layers=inputs.layers,
            prompts=prompts,
        )

    @torch.inference_mode()
    def _forward_sync(self, inputs: SpanInputs) -> torch.Tensor:
        hidden = inputs.hidden_states.to(self.device, self.dtype)
        prompts = inputs.prompts.to(self.device, self.dtype) if inputs.prompts is not None else None
        return self._call_span(inputs, hidden, prompts).to("cpu", inputs.wire_dtype)

    def _backward_sync(self, inputs: SpanInputs) -> list[torch.Tensor]:
        """Recompute the span's forward from the inputs, then backpropagate grad_outputs to the inputs
        (and prompts). The span's weights are frozen: nothing here can change them."""
        with torch.enable_grad():
            hidden = inputs.hidden_states.to(self.device, self.dtype).requires_grad_(True)
            prompts = None
            if inputs.prompts is not None:
                prompts = inputs.prompts.to(self.device, self.dtype).requires_grad_(True)
            out = self._call_span(inputs, hidden, prompts)
            targets = [hidden] + ([prompts] if prompts is not None else [])
            grads = torch.autograd.grad(
                out, targets, grad_outputs=inputs.grad_outputs.to(out.device, out.dtype)
            )
        return [grad.to("cpu", inputs.wire_dtype) for grad in grads]

    async def backward(self, inputs: SpanInputs) -> list[torch.Tensor]:
        """Gradients w.r.t. the inputs (and prompts), on the compute thread, bounded by the timeout."""
        return await self._run(self._backward_sync, inputs)

    async def forward(self, inputs: SpanInputs) -> torch.Tensor:
        """Run the span on the compute thread, bounded by the request timeout."""
        return await self._run(self._forward_sync, inputs)

    @torch.inference_mode()
    def _inference_sync(self, session: Session, position: int, inputs: SpanInputs) -> torch.Tensor:
        small = _tokens(inputs) <= INLINE_STEP_TOKENS
        started = time.perf_counter()
        with self.sessions.computing(session):
            output = self._inference_step_sync(session, position, inputs)
        if small:
            self.small_step_seconds = time.perf_counter() - started
        return output

    @staticmethod
    def _prepare_cache(session: Session, position: int, layers: slice) -> None:
        """The session's cache, allocated at its first step and cut back to `position` on a rewind."""
        if session.cache is None:
            session.cache = SpanCache(layers.start, layers.stop - layers.start, session.max_length)
        if position < session.length:
            session.cache.truncate(position)  # the client rewinds: recompute from `position`
            session.length = position

    def _inference_step_sync(self, session: Session, position: int, inputs: SpanInputs) -> torch.Tensor:
        self._prepare_cache(session, position, inputs.layers)
        before = session.cache.snapshot()
        try:
            if inputs.hypo_ids is not None:
                session.cache.reorder(inputs.hypo_ids)
            hidden = inputs.hidden_states.to(self.device, self.dtype)
            prompts = inputs.prompts.to(self.device, self.dtype) if inputs.prompts is not None else None
            out = self._call_span(inputs, hidden, prompts, cache=session.cache)
        except BaseException:
            session.cache.restore(before)  # a step that fails half-way leaves the cache as it was
            session.cache.truncate(position)
            raise
        session.length = position + hidden.shape[1]
        return out.to("cpu", inputs.wire_dtype)

    def _batchable_step(self, inputs: SpanInputs) -> bool:
        """A one-token step of a one-row session with nothing but hidden states (and maybe positions):
        what decode_sessions runs together with other sessions' steps."""
        return (
            self.decode_batch > 1
            and tuple(inputs.hidden_states.shape[:2]) == (1, 1)
            and inputs.attention_mask is None
            and inputs.prompts is None
            and inputs.hypo_ids is None
        )

    @torch.inference_mode()
    def _inference_batch_sync(self, steps: list[tuple[Session, int, SpanInputs]]) -> list[tuple[bool, Any]]:
        """Decode steps of several sessions (on the same layers) as one call: one (ok, output or error)
        per step. A step that cannot start (a closed session) fails alone; if the batched call fails,
        every cache is put back and each step runs alone, so that an error is its own session's."""
        started = time.perf_counter()
        try:
            return self._run_batch(steps)
        finally:
            self.batch_seconds = time.perf_counter() - started

    def _run_batch(self, steps: list[tuple[Session, int, SpanInputs]]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any] | None] = [None] * len(steps)
        with contextlib.ExitStack() as computing:
            ready = []
            for index, (session, position, inputs) in enumerate(steps):
                try:
                    computing.enter_context(self.sessions.computing(session))
                    self._prepare_cache(session, position, inputs.layers)
                    ready.append(index)
                except Exception as e:
                    outcomes[index] = (False, e)
            if ready:
                self._decode_ready([steps[i] for i in ready], ready, outcomes)
        return outcomes

    def _decode_ready(self, steps: list[tuple[Session, int, SpanInputs]], indices: list[int], outcomes: list):
        """Run `steps` (their sessions ready) through decode_sessions; outcomes[indices[i]] is step i's."""
        snapshots = [session.cache.snapshot() for session, _, _ in steps]
        try:
            hidden = torch.cat([inputs.hidden_states for _, _, inputs in steps]).to(self.device, self.dtype)
            positions = torch.tensor(
                [
                    [int(inputs.position_ids[0, 0]) if inputs.position_ids is not None else position]
                    for _, position, inputs in steps
                ],
                device=self.device,
            )
            caches = [session.cache for session, _, _ in steps]
            out = decode_sessions(self.span, hidden, positions, caches, steps[0][2].layers)
        except Exception as e:
            logger.warning(
                "a batched decode step of %d sessions failed (%r): running each alone", len(steps), e
            )
            for (session, position, inputs), snapshot, index in zip(steps, snapshots, indices, strict=True):
                session.cache.restore(snapshot)
                session.cache.truncate(position)
                try:
                    outcomes[index] = (True, self._inference_step_sync(session, position, inputs))
                except Exception as error:
                    outcomes[index] = (False, error)
            return
        if not self.batched_steps:  # once, so that an operator (and a test) sees batching happen
            logger.info("decode steps of %d sessions ran as one call (--batch-decode)", len(steps))
        self.batched_steps += len(steps)
        for row, ((session, position, inputs), index) in enumerate(zip(steps, indices, strict=True)):
            session.length = position + 1
            outcomes[index] = (True, out[row : row + 1].to("cpu", inputs.wire_dtype))

    def _decoding_sessions(self, session: Session) -> int:
        """Note this session's decode step; how many sessions on its layers (itself included) sent one
        within BATCH_PEER_WINDOW."""
        now = time.monotonic()
        seen = self._decode_seen
        seen[id(session)] = (session, now)
        for key in [key for key, (other, at) in seen.items() if other.closed or now - at > BATCH_PEER_WINDOW]:
            del seen[key]  # closed sessions leave at once, idle ones after a window
        return sum(1 for other, _ in seen.values() if other.layers == session.layers)

    async def inference_step(self, session: Session, position: int, inputs: SpanInputs) -> torch.Tensor:
        """One step of a session: new tokens' hidden states through the span, extending its KV cache.

        A decode step (at most INLINE_STEP_TOKENS tokens) while the compute thread is idle, on a span whose
        last such step took under INLINE_STEP_SECONDS, runs right here on the event loop's thread: handing
        it to the compute thread and back costs two thread switches, more than the step itself on a small
        span. Anything else, or a busy node, queues as usual.

        With --batch-decode, while other sessions send decode steps here too, a one-token step queues
        instead (at inference priority, like every step) to run together with their waiting steps."""
        if self._batchable_step(inputs) and (active := self._decoding_sessions(session)) > 1:
            batch = Batchable(
                (inputs.layers.start, inputs.layers.stop),
                self._inference_batch_sync,
                self.decode_batch,
                expected=active,
                max_wait=min(BATCH_GATHER_SHARE * self.batch_seconds, BATCH_GATHER_MAX),
            )
            return await self._run(
                self._inference_sync, session, position, inputs, priority=INFERENCE, batch=batch
            )
        if (
            _tokens(inputs) <= INLINE_STEP_TOKENS
            and self.small_step_seconds < INLINE_STEP_SECONDS
            and self.retired is None
        ):
            ran, output = self.executor.run_if_idle(self._inference_sync, session, position, inputs)
            if ran:
                return output
        return await self._run(self._inference_sync, session, position, inputs, priority=INFERENCE)

    async def _run(self, fn, *args, priority: int = SERVE, batch: Batchable | None = None):
        try:
            if self.retired is not None:
                raise RuntimeError(self.retired)
            future = asyncio.wrap_future(self.executor.submit(fn, *args, priority=priority, batch=batch))
        except RuntimeError:  # retired, or its executor shut down meanwhile
            raise RequestError(
                swarm_pb2.Error.UNKNOWN_BLOCKS, self.retired or "this span is shut down"
            ) from None
        return await asyncio.wait_for(future, timeout=self.limits.request_timeout)

    def retire(self, now_serving: tuple[int, int]) -> None:
        """Take no more work on this span (the node moved to `now_serving`): work already queued finishes,
        new work gets UNKNOWN_BLOCKS (clients re-route and replay elsewhere, nobody is banned), and the
        weights are freed as soon as the queue drains, whoever still holds this backend."""
        self.retired = f"this node moved to blocks [{now_serving[0]}, {now_serving[1]})"
        self.executor.shutdown(wait=False)
        threading.Thread(target=self._free_when_drained, name="swarm-retire", daemon=True).start()

    def _free_when_drained(self) -> None:
        self.executor.shutdown(wait=True)
        try:
            self.span.to("meta")  # parameters and buffers without storage: their memory goes back now
        except Exception as e:  # not worth failing a move over: the weights go when the last holder does
            logger.warning("freeing the old span's weights failed: %r", e)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
