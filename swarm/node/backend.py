"""The node's span of blocks: request checks and the compute thread that runs them."""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass

import torch

from swarm.models.span import LlamaSpan
from swarm.node.errors import RequestError
from swarm.node.limits import NodeLimits
from swarm.proto import swarm_pb2
from swarm.utils.tensors import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    TensorTooLargeError,
    check_finite,
    deserialize_checked,
)


@dataclass
class SpanInputs:
    """A checked request: hidden states plus optional mask and positions, and the layers to run."""

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    layers: slice
    wire_dtype: torch.dtype


class SpanBackend:
    """Owns the span module; all tensor work runs on one compute thread, off the event loop."""

    def __init__(self, span: LlamaSpan, limits: NodeLimits, device: str, dtype: torch.dtype):
        self.span, self.limits, self.device, self.dtype = span, limits, device, dtype
        self.hidden_size = span.config.hidden_size
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="swarm-compute"
        )

    @property
    def start(self) -> int:
        return self.span.start

    @property
    def end(self) -> int:
        return self.span.end

    def check_blocks(self, start: int, end: int) -> slice:
        """The local layer slice for blocks [start, end), which must lie inside this node's span."""
        if not (self.start <= start < end <= self.end):
            raise RequestError(
                swarm_pb2.Error.UNKNOWN_BLOCKS,
                f"blocks [{start}, {end}) are not served here; this node serves [{self.start}, {self.end})",
            )
        return slice(start - self.start, end - self.start)

    def parse_inputs(self, start: int, end: int, tensors, attention_mask, position_ids) -> SpanInputs:
        """Decode and check a forward-style request; raises RequestError / BadTensorError."""
        layers = self.check_blocks(start, end)
        if len(tensors) != 1:
            raise RequestError(
                swarm_pb2.Error.BAD_REQUEST, f"expected 1 tensor (hidden states), got {len(tensors)}"
            )
        hidden = deserialize_checked(
            tensors[0],
            name="hidden_states",
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
        check_finite(hidden, "hidden_states")
        mask = self._parse_index_tensor(attention_mask, "attention_mask", (batch, seq_len))
        positions = self._parse_index_tensor(position_ids, "position_ids", (batch, seq_len))
        if positions is not None and (positions < 0).any():
            raise RequestError(swarm_pb2.Error.BAD_REQUEST, "position_ids must be non-negative")
        return SpanInputs(hidden, mask, positions, layers, hidden.dtype)

    def _parse_index_tensor(self, proto, name: str, shape: tuple[int, int]) -> torch.Tensor | None:
        if proto is None or not proto.ListFields():
            return None
        tensor = deserialize_checked(
            proto, name=name, allowed_dtypes=INDEX_DTYPES, ndim=2, max_bytes=self.limits.max_request_bytes
        )
        if tuple(tensor.shape) != shape:
            raise RequestError(
                swarm_pb2.Error.BAD_REQUEST, f"{name} has shape {tuple(tensor.shape)}, expected {shape}"
            )
        return tensor.long()

    @torch.inference_mode()
    def _forward_sync(self, inputs: SpanInputs) -> torch.Tensor:
        hidden = inputs.hidden_states.to(self.device, self.dtype)
        mask = inputs.attention_mask.to(self.device) if inputs.attention_mask is not None else None
        positions = inputs.position_ids.to(self.device) if inputs.position_ids is not None else None
        out = self.span(hidden, attention_mask=mask, position_ids=positions, layers=inputs.layers)
        return out.to("cpu", inputs.wire_dtype)

    async def forward(self, inputs: SpanInputs) -> torch.Tensor:
        """Run the span on the compute thread, bounded by the request timeout."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.executor, self._forward_sync, inputs)
        return await asyncio.wait_for(future, timeout=self.limits.request_timeout)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
