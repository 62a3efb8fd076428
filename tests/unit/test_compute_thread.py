"""A span's compute threads: requests before verification work, and traces beside requests."""

import asyncio
import os
import sys
import threading

import pytest
import torch

from swarm.models.span import LlamaSpan
from swarm.models.tiny import tiny_llama_config
from swarm.node.backend import SpanBackend, SpanInputs
from swarm.node.compute import LOWEST_CPU_PRIORITY, SERVE, VERIFY, ComputeThread
from swarm.node.limits import NodeLimits
from swarm.verification.trace import trace_span


def test_requests_go_before_verification_work_and_each_priority_keeps_its_order():
    compute = ComputeThread()
    release, ran = threading.Event(), []
    busy = compute.submit(release.wait, 10)  # holds the thread while the rest queues
    futures = [
        compute.submit(ran.append, name, priority=priority)
        for name, priority in [("trace1", VERIFY), ("step1", SERVE), ("trace2", VERIFY), ("step2", SERVE)]
    ]
    release.set()
    for future in [busy, *futures]:
        future.result(10)
    assert ran == ["step1", "step2", "trace1", "trace2"]
    compute.shutdown()


def test_errors_reach_the_caller_and_shutdown_cancels_what_is_queued():
    compute = ComputeThread()
    with pytest.raises(ZeroDivisionError):
        compute.submit(lambda: 1 / 0).result(10)
    started, release = threading.Event(), threading.Event()

    def hold():
        started.set()
        return release.wait(10)

    running = compute.submit(hold)
    assert started.wait(10)
    queued = compute.submit(lambda: "never")
    compute.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError):
        compute.submit(lambda: None)
    release.set()
    assert running.result(10) is True  # the call that was running finishes
    compute.shutdown(wait=True)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are a Linux feature")
def test_a_nice_thread_lowers_only_its_own_priority():
    compute, plain = ComputeThread(nice=LOWEST_CPU_PRIORITY), ComputeThread()

    def own_nice():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    assert compute.submit(own_nice).result(10) == LOWEST_CPU_PRIORITY
    assert plain.submit(own_nice).result(10) == os.getpriority(os.PRIO_PROCESS, 0)
    compute.shutdown()
    plain.shutdown()


def test_a_trace_beside_a_request_records_only_its_own_forward():
    """A frozen span traces on its verification thread while its compute thread serves a request with the
    same modules: the request's answer and the trace are both what they are alone."""
    torch.manual_seed(0)
    span = LlamaSpan(tiny_llama_config(num_blocks=2, hidden_size=32), 0, 2).float()
    backend = SpanBackend(span, NodeLimits(), "cpu", torch.float32)
    hidden = torch.randn(1, 5, 32)
    inputs = SpanInputs(hidden, None, None, slice(0, 2), torch.float32)
    alone = trace_span(span, hidden)
    inside, served = threading.Event(), threading.Event()

    def pause_the_trace(module, args):
        if threading.current_thread().name == "swarm-verify":
            inside.set()
            served.wait(10)

    span.layers[0].register_forward_pre_hook(pause_the_trace)

    async def scenario():
        trace = asyncio.ensure_future(backend._run(trace_span, span, hidden, priority=VERIFY))
        assert await asyncio.to_thread(inside.wait, 10)
        output = await backend.forward(inputs)  # the trace is paused in its first block meanwhile
        served.set()
        return output, await trace

    try:
        output, traced = asyncio.run(scenario())
    finally:
        backend.shutdown()
    assert torch.equal(output, alone.output)
    assert torch.equal(traced.output, alone.output)
    for block_alone, block_traced in zip(alone.blocks, traced.blocks, strict=True):
        for (op, a), (same_op, b) in zip(block_alone, block_traced, strict=True):
            assert op == same_op and torch.equal(a, b), op
