"""A Byzantine-robust all-reduce on hivemind: each reducer keeps every sender's part and reduces them with a
robust rule from `swarm.averaging.reducers` (CenteredClip, median, trimmed mean) instead of a running sum.

How it plugs into hivemind 1.1.12 (averaging/allreduce.py, partition.py, averager.py):
- `RobustTensorPartReducer` replaces `TensorPartReducer`: it stores each sender's part of the current part
  index and, once every (non-banned) sender has sent it, reduces them in a worker thread. The weight each
  sender reports is ignored: it is the sender's own claim, and BTARD's rules weigh senders equally.
- `RobustAllReduceRunner` replaces `AllReduceRunner`'s reducer with it and refuses parts that arrive
  compressed (anything but CompressionType.NONE): a lossy codec would let a sender's part differ from what
  it hashes or claims, and robust rules are meant to see exactly what was sent. A refused sender is banned
  from this all-reduce, so the others finish without it.
- `RobustDecentralizedAverager` makes the averager's all-reduce use that runner.

Chunks: hivemind splits the flattened tensors into parts of at most `part_size_bytes` (2^19 bytes by
default, i.e. 131,072 fp32 values), and each part is reduced on its own, by the peer it is assigned to.
We keep that: the rule runs **per chunk**. A coordinate-wise rule (median, trimmed mean) gives the same
result as over whole vectors; CenteredClip's norms ||x_i - v|| are per chunk, so `tau` bounds each chunk's
pull, not the whole vector's (b attackers can shift each chunk by about b * tau / (n - b)). Reducing whole
vectors would need one peer to gather every sender's full tensors, defeating the butterfly all-reduce.
Pass a larger `part_size_bytes` to the averager for fewer, larger chunks.

Each sender gets back `result - its own part`, so a malicious reducer can still send different results to
different peers; detecting that (hashing the results) is the job of a layer above.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.proto import averaging_pb2, runtime_pb2

from swarm.averaging.group import SwarmDecentralizedAverager

logger = logging.getLogger(__name__)

RobustReducer = Callable[[torch.Tensor], torch.Tensor]


class RobustTensorPartReducer(TensorPartReducer):
    """Keeps every sender's part and reduces them with `reducer` once all have arrived (weights ignored).

    :param part_shapes: shapes of the parts this peer reduces, in order
    :param num_senders: peers that send parts (the group minus auxiliary peers)
    :param reducer: f(stacked parts of shape (n_senders, *part_shape)) -> reduced part
    """

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, *, reducer: RobustReducer):
        self.reducer = reducer
        self._parts: dict[int, torch.Tensor] = {}
        self._reducing = False
        self._reduce_task: asyncio.Task | None = None
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        """Move on to the next part index (or finish after the last one)."""
        assert self.current_part_accumulated_from == self.num_current_senders or self.current_part_index == -1
        self._parts, self._reducing = {}, False
        self.accumulator = None  # the parent's finalize deletes it
        if self.current_part_index >= self.num_parts - 1:
            self.finalize()
            return
        self.current_part_index += 1
        self.current_part_accumulated_from = 0
        self.current_part_future = asyncio.Future()
        self.num_current_senders = sum(self.current_part_index < after for after in self.sender_failed_after)
        self.denominator = 0.0

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        """Store a sender's part, wait for every other sender's, return the robust reduction.

        `weight` is accepted for the interface and ignored. A malformed part (wrong shape, NaN/inf) raises
        AllreduceException before anything is counted, so banning its sender cannot leave the part waiting.
        """
        if not 0 <= sender_index < self.num_senders or not 0 <= part_index < self.num_parts:
            raise AllreduceException(f"invalid sender {sender_index} or part {part_index}")
        expected = torch.Size(self.part_shapes[part_index])
        if tensor_part.shape != expected:
            raise AllreduceException(
                f"part {part_index} has shape {tuple(tensor_part.shape)}, expected {expected}"
            )
        if not tensor_part.is_floating_point() or not bool(torch.isfinite(tensor_part).all()):
            raise AllreduceException(f"part {part_index} from sender {sender_index} is not finite floats")

        while part_index > self.current_part_index:  # earlier parts are still being reduced
            finished = asyncio.ensure_future(self.finished.wait())
            try:
                await asyncio.wait({self.current_part_future, finished}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                finished.cancel()
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {type(self).__name__}")

        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        if part_index != self.current_part_index or sender_index in self._parts:
            raise AllreduceException(f"sender {sender_index} sent part {part_index} out of order or twice")

        # counted only once stored: on_sender_failed then expects exactly the parts we really hold
        self.num_parts_received[sender_index] += 1
        future = self.current_part_future
        self._parts[sender_index] = tensor_part
        self.current_part_accumulated_from += 1
        self.check_current_part_finished()
        return await future

    def check_current_part_finished(self) -> None:
        """When every current sender's part is in, reduce them off the event loop."""
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self._reducing or self.finished.is_set():
            return
        if self.current_part_accumulated_from < self.num_current_senders:
            return
        self._reducing = True
        parts = [self._parts[i] for i in sorted(self._parts)]  # sender order: same input, same result
        self._reduce_task = asyncio.create_task(self._reduce_and_advance(parts, self.current_part_future))

    async def _reduce_and_advance(self, parts: list[torch.Tensor], future: asyncio.Future) -> None:
        try:
            if not parts:
                raise AllreduceException("every sender of this part failed")
            stacked = torch.stack(parts)
            # CenteredClip may take hundreds of iterations: don't block the averager's event loop
            result = await asyncio.get_running_loop().run_in_executor(None, self.reducer, stacked)
            result = result.to(parts[0].dtype).reshape(parts[0].shape)
        except Exception as e:
            logger.warning("robust reducer failed on part %d: %r", self.current_part_index, e)
            if not future.done():
                future.set_exception(AllreduceException(f"robust reducer failed: {e!r}"))
                future.exception()  # retrieved here: only the senders' awaits need it
            self.finalize()
            return
        if self.finished.is_set() or future.done():
            return  # finalized (cancelled) while reducing
        future.set_result(result)
        self.reset_accumulators()

    def finalize(self) -> None:
        """Stop: cancel the current part and drop stored parts."""
        self._parts = {}
        super().finalize()


class RobustAllReduceRunner(AllReduceRunner):
    """hivemind's butterfly all-reduce with `RobustTensorPartReducer` that refuses compressed parts.

    :param reducer: f(stacked parts) -> reduced part, e.g. `get_reducer("centered_clip", tau=1.0)`
    Other parameters are AllReduceRunner's.
    """

    def __init__(self, *, reducer: RobustReducer, **kwargs: Any):
        super().__init__(**kwargs)
        plain = self.tensor_part_reducer
        plain.finished.set()  # discarded unused: keep its finalize from warning "received 0% of inputs"
        self.tensor_part_reducer = RobustTensorPartReducer(
            plain.part_shapes, plain.num_senders, reducer=_ignore_weights(reducer)
        )

    async def _accumulate_parts_streaming(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        async def uncompressed_only() -> AsyncIterator[averaging_pb2.AveragingData]:
            async for message in stream:
                if message.tensor_part.compression != runtime_pb2.CompressionType.NONE:
                    # raising here bans the sender for the rest of this all-reduce (AllReduceRunner)
                    name = runtime_pb2.CompressionType.Name(message.tensor_part.compression)
                    raise AllreduceException(f"sender {sender_index} sent a {name}-compressed part")
                yield message

        async for reply in super()._accumulate_parts_streaming(uncompressed_only(), sender_index):
            yield reply


def _ignore_weights(reducer: Callable[..., torch.Tensor]) -> RobustReducer:
    # senders report their own weights; a robust rule must not let a claim of 10^6 samples buy influence
    def reduce_equal_weights(stacked: torch.Tensor) -> torch.Tensor:
        return reducer(stacked, None)

    return reduce_equal_weights


class RobustDecentralizedAverager(SwarmDecentralizedAverager):
    """A `DecentralizedAverager` (with GroupAverager's per-round settings) whose all-reduce is robust.

    :param reducer: f(x of shape (n_senders, ...), weights=None) -> tensor, e.g. from `get_reducer`; it is
      called with weights=None (reported weights are ignored)
    Other parameters are DecentralizedAverager's; `compression` must stay NoCompression (peers refuse
    compressed parts).
    """

    runner_class = RobustAllReduceRunner

    def __init__(self, *args: Any, reducer: Callable[..., torch.Tensor], **kwargs: Any):
        self.reducer = reducer
        super().__init__(*args, **kwargs)

    def _make_runner(self, **kwargs: Any) -> AllReduceRunner:
        return RobustAllReduceRunner(reducer=self.reducer, **kwargs)
