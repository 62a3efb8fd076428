"""Forward and backward through the swarm's frozen blocks as one differentiable operation.

The batch is split into chunks that fit one message, and every chunk walks the route on its own:
chunk 2 is at the first span while chunk 1 is already at the second, so the spans work at once
(pipelining) instead of waiting for the whole batch. Each chunk remembers its inputs to every span;
backward walks the spans in reverse, again chunk by chunk. Nodes recompute their forward from the
inputs sent (they keep no state), so when a node fails, in forward or between forward and backward,
the chunks that needed it ban it and are served by another node from where they stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from swarm.client.errors import blame
from swarm.client.inference import BUSY_COOL_DOWN
from swarm.client.remote import remote_backward, remote_forward
from swarm.client.second_opinion import SecondOpinion
from swarm.protocol import MAX_UNARY_MESSAGE_BYTES

if TYPE_CHECKING:
    from swarm.client.routing import RemoteSpan
    from swarm.client.swarm_client import SwarmClient
    from swarm.verification.spot_check import SpotCheck

logger = logging.getLogger(__name__)

MAX_CHUNK_BATCH = 32


class SpotCheckFailed(RuntimeError):
    """A spot check showed that a node's forward output cannot be used."""


@dataclass
class SpanRecord:
    """One chunk's input to one span of the forward pass."""

    span: RemoteSpan  # the node that served it, tried first in backward
    inputs: torch.Tensor

    @property
    def start(self) -> int:
        return self.span.start

    @property
    def end(self) -> int:
        return self.span.end


@dataclass
class ChunkRecord:
    """What backward needs from one chunk: its rows of the batch and its inputs to every span."""

    rows: slice
    spans: list[SpanRecord]


def batch_chunks(hidden: torch.Tensor, extra_bytes: int = 0, max_rows: int | None = None) -> list[slice]:
    """Slices of the batch such that each chunk's forward request fits a unary message (and has at most
    `max_rows` rows): the micro-batches that pipeline through the spans."""
    batch = hidden.shape[0]
    per_row = hidden[0].numel() * hidden.element_size()
    budget = max(1, (MAX_UNARY_MESSAGE_BYTES // 2 - extra_bytes) // max(per_row, 1))
    size = max(1, min(MAX_CHUNK_BATCH, budget, max_rows or MAX_CHUNK_BATCH))
    return [slice(i, min(batch, i + size)) for i in range(0, batch, size)]


async def _all(coroutines) -> list:
    """Results of all coroutines, in order; if one fails, the others are cancelled (no orphan calls)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coroutine) for coroutine in coroutines]
    except* Exception as failed:  # the first failure, as itself (callers catch e.g. MissingBlocksError)
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


def _optional_rows(tensor: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if tensor is None else tensor[rows]


class SwarmBlocks:
    """Runs blocks on the swarm, chunk by chunk, with retries on other nodes."""

    def __init__(self, client: SwarmClient):
        self.client = client
        self.last_route: list[RemoteSpan] = []  # the route the first chunk of the last forward took
        self.spot_checks: list[SpotCheck] = []  # what spot checks of forward calls found, oldest first
        self._route_lock: asyncio.Lock | None = None

    async def _route(self, start: int, end: int, exclude: frozenset[str] = frozenset()) -> list[RemoteSpan]:
        """A fresh forward route, looked up off the event loop (the lookup itself uses the loop)."""
        if self._route_lock is None:
            self._route_lock = asyncio.Lock()
        async with self._route_lock:  # chunks failing together look up one at a time
            return await asyncio.to_thread(self.client.find_route, start, end, "forward", exclude)

    async def _failed(
        self, span: RemoteSpan, kind: str, error: Exception, failures: int, opinion: SecondOpinion
    ) -> None:
        """After a failed call: if the node refused our own request, ask another node (RequestRefused when
        none serves it or it refuses too), else ban the node (or skip a busy one for a moment) unless
        `failures` passed max_retries."""
        culprit = blame(error)
        if culprit == "request":
            await asyncio.to_thread(opinion.refused, error, span)
            return
        logger.warning("node %s failed %s on [%d, %d): %r", span.peer_id, kind, span.start, span.end, error)
        if failures > self.client.config.max_retries:
            raise error
        if culprit == "busy":
            self.client.bans.cool_down(span.peer_id, BUSY_COOL_DOWN)
        elif span.peer_id not in self.client.bans:  # chunks that failed on it together ban it once
            self.client.ban(span.peer_id)

    def _span_prompts(self, prompts, span: RemoteSpan):
        return None if prompts is None else prompts[span.start : span.end]

    async def _forward_span(self, span: RemoteSpan, hidden, prompts, mask, positions) -> torch.Tensor:
        started = time.perf_counter()
        outputs = await self._remote_forward(span, hidden, prompts, mask, positions)
        block_tokens = hidden.shape[0] * hidden.shape[1] * (span.end - span.start)
        self.client.record_hop(span.peer_id, block_tokens, time.perf_counter() - started)
        return outputs

    async def _remote_forward(self, span: RemoteSpan, hidden, prompts, mask, positions) -> torch.Tensor:
        return await remote_forward(
            self.client.p2p,
            span.peer_id,
            span.start,
            span.end,
            hidden,
            mask,
            positions,
            self.client.config.request_timeout,
            prompts=self._span_prompts(prompts, span),
        )

    async def _backward_span(self, span: RemoteSpan, hidden, grad_outputs, prompts, mask, positions):
        return await remote_backward(
            self.client.p2p,
            span.peer_id,
            span.start,
            span.end,
            hidden,
            grad_outputs,
            mask,
            positions,
            self.client.config.request_timeout,
            prompts=self._span_prompts(prompts, span),
        )

    # ---- forward ------------------------------------------------------------------------------------------

    def forward(self, hidden, prompts, mask, positions, start: int = 0, end: int | None = None):
        """Hidden states through blocks [start, end); returns them and one record per chunk.

        Results come back on `hidden`'s device; the records and everything sent stay on CPU.
        """
        if hidden.shape[0] == 0:
            raise ValueError("the batch is empty")
        device, hidden = hidden.device, hidden.cpu()
        prompts = None if prompts is None else prompts.cpu()
        client = self.client
        end = client.num_blocks if end is None else end
        extra = 0 if prompts is None else prompts[0].numel() * prompts.element_size() * (end - start)
        chunks = batch_chunks(hidden, extra, client.config.max_chunk_rows)
        route = client.find_route(start, end, mode="forward")  # one route for all chunks: they pipeline

        results = client.run_async(
            _all(
                self._forward_chunk(rows, hidden[rows], prompts, mask, positions, start, end, route)
                for rows in chunks
            )
        )
        self.last_route = results[0][2]
        outputs = torch.cat([output for output, _, _ in results], dim=0)
        return outputs.to(device), [record for _, record, _ in results]

    async def _forward_chunk(self, rows, hidden, prompts, mask, positions, start, end, route):
        mask, positions = _optional_rows(mask, rows), _optional_rows(positions, rows)
        block, failures, spans, used = start, 0, [], []
        opinion = SecondOpinion(self.client)
        force_check = False  # the call that replaces a convicted node's is checked too
        while block < end:
            span = route[0]
            try:
                checker = self.client.spot_checker
                if prompts is None and checker is not None and (force_check or checker.should_check()):
                    force_check = True
                    outputs = await self._forward_and_check(checker, span, hidden, mask, positions)
                    force_check = False
                else:
                    outputs = await self._forward_span(span, hidden, prompts, mask, positions)
            except Exception as e:
                failures += 1
                await self._failed(span, "forward", e, failures, opinion)
                route = await self._route(block, end, opinion.excluded)
                continue
            opinion.served()
            spans.append(SpanRecord(span, hidden))
            used.append(span)
            hidden, block, route = outputs, span.end, route[1:]
        return hidden, ChunkRecord(rows, spans), used

    async def _forward_and_check(self, checker, span: RemoteSpan, hidden, mask, positions) -> torch.Tensor:
        """A span call, checked against a second node at the same time (swarm.verification.spot_check); raises
        SpotCheckFailed when `span`'s node was convicted or served otherwise than it committed (the call is
        then made again elsewhere, and checked: a dispute's winner is only right about the disputed operator).
        Calls with deep prompts are not checked: commitments cover the blocks' plain forward only."""
        servers = await asyncio.to_thread(self.client.usable_servers)
        check = asyncio.ensure_future(
            checker.check(span.info, span.start, span.end, hidden, mask, positions, servers)
        )
        try:
            outputs = await self._forward_span(span, hidden, None, mask, positions)
        except BaseException:
            check.cancel()  # the node failed the call: it is replaced, and its replacement checked
            check.add_done_callback(lambda done: done.cancelled() or done.exception())  # nobody awaits it
            raise
        result = await check
        self.spot_checks.append(result)
        self.client.convict(result.convicted)
        if span.peer_id in result.convicted:
            raise SpotCheckFailed(f"{span.peer_id} was convicted on blocks [{span.start}, {span.end})")
        if not result.served_matches(outputs):
            raise SpotCheckFailed(
                f"{span.peer_id} served blocks [{span.start}, {span.end}) otherwise than it committed"
            )
        return outputs

    # ---- backward -----------------------------------------------------------------------------------------

    def backward(self, records: list[ChunkRecord], grad_outputs, prompts, mask, positions):
        """Gradients w.r.t. the inputs and the deep prompts, every chunk through its spans in reverse.

        They come back on `grad_outputs`' device (the device forward's inputs were on).
        """
        device, grad_outputs = grad_outputs.device, grad_outputs.cpu()
        prompts = None if prompts is None else prompts.cpu()

        results = self.client.run_async(
            _all(
                self._backward_chunk(record, grad_outputs[record.rows], prompts, mask, positions)
                for record in records
            )
        )
        grad_inputs = torch.cat([grad for grad, _ in results], dim=0).to(device)
        if prompts is None:
            return grad_inputs, None
        return grad_inputs, sum(grad_prompts for _, grad_prompts in results).to(device)

    async def _backward_chunk(self, record: ChunkRecord, grad, prompts, mask, positions):
        mask, positions = _optional_rows(mask, record.rows), _optional_rows(positions, record.rows)
        grad_prompts = None if prompts is None else torch.zeros_like(prompts)
        for span_record in reversed(record.spans):
            grad, span_grad_prompts = await self._backward_range(span_record, grad, prompts, mask, positions)
            if grad_prompts is not None:
                grad_prompts[span_record.start : span_record.end] += span_grad_prompts
        return grad, grad_prompts

    async def _backward_range(self, record: SpanRecord, grad_outputs, prompts, mask, positions):
        """Backward through [start, end) for one chunk, on the same node unless it failed; then ban it and
        cover the range again (recomputing intermediate inputs if the new route has more hops)."""
        failures, route = 0, [record.span]
        opinion = SecondOpinion(self.client)
        if record.span.peer_id in self.client.convicted:  # convicted after this chunk's forward
            route = await self._route(record.start, record.end)
        while True:
            current = route[0]
            try:
                inputs = [record.inputs]
                for current in route[:-1]:
                    inputs.append(await self._forward_span(current, inputs[-1], prompts, mask, positions))
                grad = grad_outputs
                grad_prompts = (
                    None if prompts is None else torch.zeros_like(prompts[record.start : record.end])
                )
                for current, span_inputs in zip(reversed(route), reversed(inputs), strict=True):
                    grad, span_grad_prompts = await self._backward_span(
                        current, span_inputs, grad, prompts, mask, positions
                    )
                    if grad_prompts is not None:
                        offset = current.start - record.start
                        grad_prompts[offset : offset + current.end - current.start] += span_grad_prompts
                opinion.served()
                return grad, grad_prompts
            except Exception as e:
                failures += 1
                await self._failed(current, "backward", e, failures, opinion)
                route = await self._route(record.start, record.end, opinion.excluded)


class RemoteBlocksFunction(torch.autograd.Function):
    """hidden (and deep prompts) -> hidden after every block, differentiable through the swarm."""

    @staticmethod
    def forward(ctx, hidden, prompts, blocks: SwarmBlocks, mask, positions):
        has_prompts = prompts is not None and prompts.numel() > 0
        outputs, records = blocks.forward(
            hidden.detach(), prompts.detach() if has_prompts else None, mask, positions
        )
        ctx.blocks, ctx.records, ctx.mask, ctx.positions = blocks, records, mask, positions
        ctx.save_for_backward(prompts if has_prompts else None)
        ctx.has_prompts = has_prompts
        return outputs

    @staticmethod
    def backward(ctx, grad_outputs):
        (prompts,) = ctx.saved_tensors
        grad_hidden, grad_prompts = ctx.blocks.backward(
            ctx.records,
            grad_outputs.contiguous(),
            prompts.detach() if ctx.has_prompts else None,
            ctx.mask,
            ctx.positions,
        )
        return grad_hidden, (grad_prompts if ctx.has_prompts else None), None, None, None
