"""A span the node moved off: work in flight finishes, new work is refused as moved, the weights go."""

import asyncio
import threading
import time

import pytest
import torch

from swarm.models.span import LlamaSpan
from swarm.models.tiny import tiny_llama_config
from swarm.node.backend import SpanBackend, SpanInputs
from swarm.node.errors import RequestError
from swarm.node.limits import NodeLimits
from swarm.proto import swarm_pb2


def test_a_retired_span_finishes_work_in_flight_refuses_new_work_and_frees_its_weights():
    torch.manual_seed(0)
    span = LlamaSpan(tiny_llama_config(num_blocks=2, hidden_size=32), 0, 2).float()
    backend = SpanBackend(span, NodeLimits(), "cpu", torch.float32)
    inputs = SpanInputs(torch.randn(1, 3, 32), None, None, slice(0, 2), torch.float32)
    running = threading.Event()

    def slow_forward(inputs):
        running.set()
        time.sleep(0.5)
        return backend._forward_sync(inputs)

    async def scenario():
        expected = await backend.forward(inputs)
        in_flight = asyncio.ensure_future(backend._run(slow_forward, inputs))
        await asyncio.to_thread(running.wait, 5)
        backend.retire((4, 6))  # the node moved to blocks [4, 6) while the forward runs
        with pytest.raises(RequestError) as refused:
            await backend.forward(inputs)
        assert refused.value.code == swarm_pb2.Error.UNKNOWN_BLOCKS
        assert "moved to blocks [4, 6)" in str(refused.value)
        assert torch.equal(await in_flight, expected)  # the request in flight got its answer

    asyncio.run(scenario())
    deadline = time.monotonic() + 5
    while not all(p.device.type == "meta" for p in span.parameters()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(p.device.type == "meta" for p in span.parameters())  # no storage left behind


def test_decode_steps_run_inline_only_once_one_measured_short():
    """A decode step may skip the compute thread's hand-off, but only on a span whose last decode step took
    under INLINE_STEP_SECONDS: a big span's step would hold up every other call the event loop answers."""
    from swarm.node.backend import INLINE_STEP_SECONDS
    from swarm.node.sessions import Session

    torch.manual_seed(0)
    span = LlamaSpan(tiny_llama_config(num_blocks=2, hidden_size=32), 0, 2).float()
    backend = SpanBackend(span, NodeLimits(), "cpu", torch.float32)
    threads: list[str] = []
    span.layers[0].register_forward_pre_hook(
        lambda module, args: threads.append(threading.current_thread().name)
    )
    session = Session("s", 0, 2, slice(0, 2), max_length=16)

    async def step(position: int, tokens: int) -> None:
        inputs = SpanInputs(torch.randn(1, tokens, 32), None, None, slice(0, 2), torch.float32)
        await backend.inference_step(session, position, inputs)

    async def scenario():
        loop_thread = threading.current_thread().name
        await step(0, 4)  # nothing measured yet: on the compute thread
        assert threads[-1] != loop_thread and backend.small_step_seconds < float("inf")
        backend.small_step_seconds = 0.0  # as after a short step (not timed here: the machine may be busy)
        await step(4, 1)
        assert threads[-1] == loop_thread  # inline
        backend.small_step_seconds = 10 * INLINE_STEP_SECONDS  # as after a slow one
        await step(5, 1)
        assert threads[-1] != loop_thread  # back on the compute thread, which measures it again
        assert backend.small_step_seconds != 10 * INLINE_STEP_SECONDS
        backend.small_step_seconds = 0.0
        await step(6, 9)  # more than INLINE_STEP_TOKENS never runs inline
        assert threads[-1] != loop_thread

    asyncio.run(scenario())
    backend.shutdown()
