"""A training stage's span on a node: trainable fp32 blocks whose backward also adds weight gradients."""

from __future__ import annotations

import time

import torch

from swarm.models.span import LlamaSpan
from swarm.node.backend import SpanBackend, SpanInputs
from swarm.node.errors import RequestError
from swarm.node.limits import NodeLimits
from swarm.proto import swarm_pb2
from swarm.training.run import OptimizerSettings
from swarm.training.trainable import TrainableParameters

THROUGHPUT_EMA = 0.1  # SWARM's smoothing of measured throughput


class TrainableSpanBackend(SpanBackend):
    """Serves stateless forward and backward of a stage; backward adds the samples' weight gradients.

    Inference sessions and deep prompts are refused. Every request and optimizer step runs on the one
    compute thread, and each reply names the step of the weights that computed it.
    """

    def __init__(self, span: LlamaSpan, limits: NodeLimits, device: str, optimizer: OptimizerSettings):
        super().__init__(span, limits, device, torch.float32)
        start = span.start
        named = [
            (f"model.layers.{start + int(name.split('.')[1])}.{name.split('.', 2)[2]}", param)
            for name, param in span.named_parameters()
            if name.startswith("layers.")
        ]
        self.trainable = TrainableParameters(
            named,
            lr=optimizer.lr,
            betas=tuple(optimizer.betas),
            eps=optimizer.eps,
            weight_decay=optimizer.weight_decay,
            clip_grad_norm=optimizer.clip_grad_norm,
        )
        self.throughput = 0.0  # samples/s of forward + backward, EMA
        self.queue_length = 0
        self.on_accumulate = None  # called (on the compute thread) after a backward added its gradients

    def check_inference(self) -> None:
        raise RequestError(
            swarm_pb2.Error.BAD_REQUEST, "this node trains a stage and serves no inference sessions"
        )

    def parse_inputs(self, start, end, tensors, attention_mask, position_ids, backward=False) -> SpanInputs:
        inputs = super().parse_inputs(start, end, tensors, attention_mask, position_ids, backward)
        if inputs.prompts is not None:
            raise RequestError(swarm_pb2.Error.BAD_REQUEST, "training stages take no deep prompts")
        if (start, end) != (self.start, self.end):
            raise RequestError(
                swarm_pb2.Error.UNKNOWN_BLOCKS,
                f"a training stage runs its whole span [{self.start}, {self.end}), not [{start}, {end})",
            )
        return inputs

    def _forward_sync(self, inputs: SpanInputs) -> torch.Tensor:
        inputs.step = self.trainable.step
        return super()._forward_sync(inputs)

    def _backward_sync(self, inputs: SpanInputs) -> list[torch.Tensor]:
        """Recompute the forward with the current weights, then return d(loss)/d(inputs) and add the
        weight gradients to the stage's sums (the loss is summed over the batch's samples)."""
        started = time.perf_counter()
        inputs.step = self.trainable.step
        params = self.trainable.params
        with torch.enable_grad():
            hidden = inputs.hidden_states.to(self.device, torch.float32).requires_grad_(True)
            out = self._call_span(inputs, hidden)
            grads = torch.autograd.grad(
                out, [hidden, *params], grad_outputs=inputs.grad_outputs.to(out.device, out.dtype)
            )
        try:
            self.trainable.accumulate(grads[1:], hidden.shape[0])
        except ValueError as e:
            raise RequestError(swarm_pb2.Error.BAD_REQUEST, f"refused: {e}") from None
        rate = hidden.shape[0] / max(time.perf_counter() - started, 1e-6)
        self.throughput = (
            rate if not self.throughput else (1 - THROUGHPUT_EMA) * self.throughput + THROUGHPUT_EMA * rate
        )
        if self.on_accumulate is not None:
            self.on_accumulate()
        return [grads[0].to("cpu", inputs.wire_dtype)]

    async def _run(self, fn, *args):
        self.queue_length += 1
        try:
            return await super()._run(fn, *args)
        finally:
            self.queue_length -= 1

    async def run_on_compute_thread(self, fn, *args):
        """Run `fn` where requests run, so it never interleaves with a forward or backward."""
        return await super()._run(fn, *args)
