"""Forward and backward through the swarm's frozen blocks as one differentiable operation.

Forward runs the route span by span and remembers each span's inputs; backward asks nodes for
gradients span by span in reverse. Nodes recompute their forward from the inputs sent (they keep no
state), so when a node fails between forward and backward, another node serves that span instead.
Batches are split into chunks that fit one message and the chunks run concurrently.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from swarm.client.remote import remote_backward, remote_forward
from swarm.node.limits import MAX_UNARY_MESSAGE_BYTES

if TYPE_CHECKING:
    from swarm.client.model import DistributedModelForCausalLM
    from swarm.client.swarm_view import RemoteSpan

logger = logging.getLogger(__name__)

MAX_CHUNK_BATCH = 32


@dataclass
class SpanRecord:
    """What backward needs from one span of the forward pass."""

    start: int
    end: int
    inputs: torch.Tensor


def batch_chunks(hidden: torch.Tensor, extra_bytes: int = 0, tensors_per_row: int = 1) -> list[slice]:
    """Slices of the batch such that each chunk's request fits a unary message (backward sends two
    tensors per row: inputs and grad_outputs)."""
    batch = hidden.shape[0]
    per_row = tensors_per_row * hidden[0].numel() * hidden.element_size()
    budget = max(1, (MAX_UNARY_MESSAGE_BYTES // 2 - extra_bytes) // max(per_row, 1))
    size = max(1, min(MAX_CHUNK_BATCH, budget))
    return [slice(i, min(batch, i + size)) for i in range(0, batch, size)]


def _optional_rows(tensor: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if tensor is None else tensor[rows]


class SwarmBlocks:
    """Runs blocks of `model` on the swarm, with retries on other nodes."""

    def __init__(self, model: DistributedModelForCausalLM):
        self.model = model

    def _in_chunks(self, span: RemoteSpan, hidden, prompts, tensors_per_row: int, call) -> list:
        """`call(rows, span_prompts)` for every batch chunk of `hidden`, concurrently; results in order."""
        timeout = self.model.client_config.request_timeout
        span_prompts = None if prompts is None else prompts[span.start : span.end]
        extra = 0 if span_prompts is None else span_prompts.numel() * span_prompts.element_size()

        async def run():
            chunks = batch_chunks(hidden, extra, tensors_per_row)
            return await asyncio.gather(*(call(rows, span_prompts) for rows in chunks))

        return self.model.run_async(run(), timeout=timeout + 5)

    def forward_span(self, span: RemoteSpan, hidden, prompts, mask, positions) -> torch.Tensor:
        timeout = self.model.client_config.request_timeout

        def call(rows, span_prompts):
            return remote_forward(
                self.model.p2p,
                span.peer_id,
                span.start,
                span.end,
                hidden[rows],
                _optional_rows(mask, rows),
                _optional_rows(positions, rows),
                timeout,
                prompts=span_prompts,
            )

        return torch.cat(self._in_chunks(span, hidden, prompts, 1, call), dim=0)

    def backward_span(self, span: RemoteSpan, hidden, grad_outputs, prompts, mask, positions):
        timeout = self.model.client_config.request_timeout

        def call(rows, span_prompts):
            return remote_backward(
                self.model.p2p,
                span.peer_id,
                span.start,
                span.end,
                hidden[rows],
                grad_outputs[rows],
                _optional_rows(mask, rows),
                _optional_rows(positions, rows),
                timeout,
                prompts=span_prompts,
            )

        results = self._in_chunks(span, hidden, prompts, 2, call)  # inputs and grad_outputs per row
        grad_inputs = torch.cat([grad for grad, _ in results], dim=0)
        grad_prompts = None if prompts is None else sum(gp for _, gp in results)
        return grad_inputs, grad_prompts

    def forward(self, hidden, prompts, mask, positions, start: int = 0, end: int | None = None):
        """Hidden states through blocks [start, end); returns them and one record per span used."""
        model = self.model
        end = model.num_blocks if end is None else end
        block, failures, records, used = start, 0, [], []
        route = model.find_route(start, end, mode="forward")
        while block < end:
            span = route[0]
            try:
                outputs = self.forward_span(span, hidden, prompts, mask, positions)
            except Exception as e:
                failures += 1
                logger.warning(
                    "node %s failed forward on [%d, %d): %r", span.peer_id, span.start, span.end, e
                )
                if failures > model.client_config.max_retries:
                    raise
                model.ban(span.peer_id)
                route = model.find_route(block, end, mode="forward")
                continue
            records.append(SpanRecord(span.start, span.end, hidden))
            used.append(span)
            hidden, block, route = outputs, span.end, route[1:]
        model.last_route = used
        return hidden, records

    def backward(self, records: list[SpanRecord], grad_outputs, prompts, mask, positions):
        """Gradients w.r.t. the first span's inputs and the deep prompts, span by span in reverse."""
        grad_prompts = None if prompts is None else torch.zeros_like(prompts)
        for record in reversed(records):
            grad_outputs, span_grad_prompts = self._backward_range(
                record, grad_outputs, prompts, mask, positions
            )
            if grad_prompts is not None:
                grad_prompts[record.start : record.end] += span_grad_prompts
        return grad_outputs, grad_prompts

    def _backward_range(self, record: SpanRecord, grad_outputs, prompts, mask, positions):
        """Backward through [start, end): on the same kind of route as forward; if a node fails, ban it
        and cover the range again (recomputing intermediate inputs if the new route has more hops)."""
        model = self.model
        failures = 0
        while True:
            route = model.find_route(record.start, record.end, mode="forward")
            current = route[0]
            try:
                inputs = [record.inputs]
                for current in route[:-1]:
                    inputs.append(self.forward_span(current, inputs[-1], prompts, mask, positions))
                grad = grad_outputs
                grad_prompts = (
                    None if prompts is None else torch.zeros_like(prompts[record.start : record.end])
                )
                for current, span_inputs in zip(reversed(route), reversed(inputs), strict=True):
                    grad, span_grad_prompts = self.backward_span(
                        current, span_inputs, grad, prompts, mask, positions
                    )
                    if grad_prompts is not None:
                        offset = current.start - record.start
                        grad_prompts[offset : offset + current.end - current.start] += span_grad_prompts
                return grad, grad_prompts
            except Exception as e:
                failures += 1
                logger.warning(
                    "node %s failed backward on [%d, %d): %r", current.peer_id, current.start, current.end, e
                )
                if failures > model.client_config.max_retries:
                    raise
                model.ban(current.peer_id)


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
