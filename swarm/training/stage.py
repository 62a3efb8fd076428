"""A training stage's span on a node: trainable fp32 blocks whose backward also adds weight gradients."""

from __future__ import annotations

import time

import torch

from swarm.models.span import LlamaSpan
from swarm.node.backend import SpanBackend, SpanInputs
from swarm.node.errors import RequestError
from swarm.node.limits import NodeLimits
from swarm.proto import swarm_pb2
from swarm.testing.faults import Fault
from swarm.training.run import OptimizerSettings
from swarm.training.state import TrainState
from swarm.training.trainable import TrainableParameters
from swarm.training.validation import (
    STAGE_MICROBATCH,
    ContributionLog,
    Microbatch,
    check_receipt,
    recompute_mean_gradient,
)

THROUGHPUT_EMA = 0.1  # SWARM's smoothing of measured throughput


class TrainableSpanBackend(SpanBackend):
    """Serves stateless forward and backward of a stage; backward adds the samples' weight gradients.

    Inference sessions and deep prompts are refused. Every request and optimizer step runs on the one
    compute thread, and each reply names the step of the weights that computed it.

    With `run_hash` (a training run), a backward call must carry its caller's signed receipt for its
    tensors; each one is kept in `log` with the gradient it went into, for validators
    (`swarm.training.validation`).
    """

    def __init__(
        self,
        span: LlamaSpan,
        limits: NodeLimits,
        device: str,
        optimizer: OptimizerSettings,
        run_hash: str | None = None,
        stage: int = 0,
        fault: Fault | None = None,
    ):
        super().__init__(span, limits, device, torch.float32)
        self.run_hash, self.stage, self.fault = run_hash, stage, fault
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
        self.log = ContributionLog()
        self.log.snapshot(self.trainable.step, self.trainable.params)

    def check_inference(self) -> None:
        raise RequestError(
            swarm_pb2.Error.BAD_REQUEST, "this node trains a stage and serves no inference sessions"
        )

    def parse_inputs(self, start, end, tensors, attention_mask, position_ids, backward=False) -> SpanInputs:
        inputs = super().parse_inputs(start, end, tensors, attention_mask, position_ids, backward)
        if inputs.prompts is not None:
            raise RequestError(swarm_pb2.Error.BAD_REQUEST, "training stages take no deep prompts")
        if backward and (attention_mask is not None or position_ids is not None):
            raise RequestError(
                swarm_pb2.Error.BAD_REQUEST, "training stages take whole sequences: no mask or positions"
            )
        if (start, end) != (self.start, self.end):
            raise RequestError(
                swarm_pb2.Error.UNKNOWN_BLOCKS,
                f"a training stage runs its whole span [{self.start}, {self.end}), not [{start}, {end})",
            )
        return inputs

    def _forward_sync(self, inputs: SpanInputs) -> torch.Tensor:
        inputs.step = self.trainable.step
        return super()._forward_sync(inputs)

    async def backward(self, inputs: SpanInputs) -> list[torch.Tensor]:
        if self.run_hash is not None:
            try:
                check_receipt(
                    inputs.receipt,
                    self.run_hash,
                    self.stage,
                    inputs.hidden_states,
                    inputs.grad_outputs,
                    signer=inputs.caller,
                )
            except ValueError as e:
                raise RequestError(
                    swarm_pb2.Error.BAD_REQUEST, f"a backward call in a training run needs a receipt: {e}"
                ) from None
        return await super().backward(inputs)

    def _gradients(self, inputs: SpanInputs) -> tuple[torch.Tensor, ...]:
        """(d(loss)/d(inputs), *d(loss)/d(params)) of a microbatch with the current weights."""
        with torch.enable_grad():
            hidden = inputs.hidden_states.to(self.device, torch.float32).requires_grad_(True)
            out = self._call_span(inputs, hidden)
            return torch.autograd.grad(
                out,
                [hidden, *self.trainable.params],
                grad_outputs=inputs.grad_outputs.to(out.device, out.dtype),
            )

    def _backward_sync(self, inputs: SpanInputs) -> list[torch.Tensor]:
        """Recompute the forward with the current weights, then return d(loss)/d(inputs) and add the
        weight gradients to the stage's sums (the loss is summed over the batch's samples)."""
        started = time.perf_counter()
        inputs.step = self.trainable.step
        grads = self._gradients(inputs)
        if self.fault is not None:
            grads = self.fault.corrupt_backward(grads, inputs.step)
        try:
            self.trainable.accumulate(grads[1:], inputs.hidden_states.shape[0])
        except ValueError as e:
            raise RequestError(swarm_pb2.Error.BAD_REQUEST, f"refused: {e}") from None
        if self.run_hash is not None:
            tensors = {"inputs": inputs.hidden_states, "grad_outputs": inputs.grad_outputs}
            self.log.add(Microbatch(STAGE_MICROBATCH, tensors, [inputs.receipt], inputs.step))
        rate = inputs.hidden_states.shape[0] / max(time.perf_counter() - started, 1e-6)
        self.throughput = (
            rate if not self.throughput else (1 - THROUGHPUT_EMA) * self.throughput + THROUGHPUT_EMA * rate
        )
        if self.on_accumulate is not None:
            self.on_accumulate()
        return [grads[0].to("cpu", inputs.wire_dtype)]

    async def _run(self, fn, *args, **kwargs):
        self.queue_length += 1
        try:
            return await super()._run(fn, *args, **kwargs)
        finally:
            self.queue_length -= 1

    async def run_on_compute_thread(self, fn, *args):
        """Run `fn` where requests run, so it never interleaves with a forward or backward."""
        return await super()._run(fn, *args)

    # ---- the optimizer's side, with what validators need kept -------------------------------------------

    def take_gradients(self) -> tuple[list[torch.Tensor], int]:
        """The mean gradients of this step's round (see TrainableParameters.take_mean_gradients)."""
        self.log.close(self.trainable.step)
        return self.trainable.take_mean_gradients()

    def apply(self, grads: list[torch.Tensor]) -> None:
        """Step the optimizer; keep the new weights for validators of the next rounds."""
        self.trainable.apply(grads)
        self.log.snapshot(self.trainable.step, self.trainable.params)

    def load(self, state: TrainState) -> None:
        """Take another peer's state: the weights of earlier steps here are not the group's any more."""
        self.trainable.load(state)
        self.log.restart(self.trainable.step, self.trainable.params)

    def recompute_mean_gradient(
        self, microbatches: list[Microbatch], weights: dict[int, list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        """The mean per-sample gradients of another peer's microbatches, each with the weights of its step
        (`weights`: step -> parameters). Runs on the compute thread; the current weights are restored."""

        def gradients_of(microbatch: Microbatch) -> tuple[list[torch.Tensor], int]:
            hidden = microbatch.tensors["inputs"]
            grad_outputs = microbatch.tensors["grad_outputs"]
            inputs = SpanInputs(hidden, None, None, slice(None), hidden.dtype, grad_outputs=grad_outputs)
            return list(self._gradients(inputs)[1:]), hidden.shape[0]

        return recompute_mean_gradient(self.trainable.params, microbatches, weights, gradients_of)

    # ---- what a validator in this stage needs (swarm.training.validation.Recomputer) ---------------------

    def gradient_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in self.trainable.params]

    def check_microbatch(self, microbatch: Microbatch) -> None:
        """A stage microbatch whose tensors this stage would have accepted, with the trainer's receipt."""
        if microbatch.kind != STAGE_MICROBATCH:
            raise ValueError(f"a stage peer's microbatch can't be a {microbatch.kind!r} one")
        inputs, grads = microbatch.tensors["inputs"], microbatch.tensors["grad_outputs"]
        if inputs.dim() != 3 or inputs.shape[-1] != self.hidden_size or grads.shape != inputs.shape:
            raise ValueError(f"tensors of shapes {tuple(inputs.shape)}, {tuple(grads.shape)}")
        if not inputs.is_floating_point() or not grads.is_floating_point():
            raise ValueError("tensors that are not floating point")
        if inputs.shape[0] > self.limits.max_batch_size or inputs.shape[1] > self.limits.max_sequence_length:
            raise ValueError(f"a batch of shape {tuple(inputs.shape)} this stage would have refused")
        check_receipt(microbatch.receipts[0], self.run_hash, self.stage, inputs, grads)

    async def recompute(
        self, microbatches: list[Microbatch], weights: dict[int, list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        return await self.run_on_compute_thread(self.recompute_mean_gradient, microbatches, weights)
