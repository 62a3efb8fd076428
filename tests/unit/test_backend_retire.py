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
