"""A span's compute thread runs requests before verification work, one call at a time."""

import threading

import pytest

from swarm.node.compute import SERVE, VERIFY, ComputeThread


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
