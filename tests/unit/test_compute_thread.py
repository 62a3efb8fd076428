"""A span's compute thread runs requests before verification work, one call at a time."""

import threading
import time

import pytest
import torch
import torch.nn.functional as F

from swarm.node.compute import INFERENCE, SERVE, VERIFY, Batchable, ComputeThread
from swarm.verification.determinism import deterministic_profile


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


def _occupy(compute: ComputeThread) -> tuple:
    """Submit a call that holds the compute thread until the returned event is set; returns (its future,
    that event) once it runs."""
    started, release = threading.Event(), threading.Event()

    def hold():
        started.set()
        return release.wait(10)

    running = compute.submit(hold)
    assert started.wait(10)
    return running, release


def test_errors_reach_the_caller_and_shutdown_cancels_what_is_queued():
    compute = ComputeThread()
    with pytest.raises(ZeroDivisionError):
        compute.submit(lambda: 1 / 0).result(10)
    running, release = _occupy(compute)
    queued = compute.submit(lambda: "never")
    compute.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError):
        compute.submit(lambda: None)
    release.set()
    assert running.result(10) is True  # the call that was running finishes
    compute.shutdown(wait=True)


def test_gemms_on_the_compute_thread_round_as_the_thread_that_pinned_the_profile():
    """torch.set_num_threads pins its own thread; a new thread's MKL GEMMs use every core until the thread
    enters ATen's parallel code, and some shapes round differently then (one ulp was enough to convict an
    honest node). The compute thread adopts the pinned count before its first call."""
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(9, 256, generator=generator), torch.randn(256, 256, generator=generator)
    with deterministic_profile():
        expected = F.linear(x, weight)
        plain: list[torch.Tensor] = []
        thread = threading.Thread(target=lambda: plain.append(F.linear(x, weight)))
        thread.start()
        thread.join()
        compute = ComputeThread()
        try:
            got = compute.submit(F.linear, x, weight).result(10)
        finally:
            compute.shutdown()
    # the compute thread must round as the pinned thread, always; a plain new thread is the control, and
    # rounds otherwise only on some machines and loads (MKL's thread count per thread), so it is not asserted
    assert torch.equal(got, expected), f"a plain thread matches: {torch.equal(plain[0], expected)}"


def test_an_idle_compute_thread_lets_the_caller_run_a_short_call_itself_and_holds_queued_work_off():
    compute = ComputeThread()
    caller = threading.current_thread()
    ran, order = compute.run_if_idle(threading.current_thread)
    assert ran and order is caller  # it ran here, not on the compute thread
    queued = []

    def inline():
        queued.append(compute.submit(order_list.append, "queued"))  # submitted while this call runs
        time.sleep(0.2)  # time enough for the compute thread to start it, were it not held off
        order_list.append("inline")  # and the compute thread must not start it before this returns
        return "done"

    order_list: list[str] = []
    assert compute.run_if_idle(inline) == (True, "done")
    queued[0].result(10)
    assert order_list == ["inline", "queued"]
    compute.shutdown()


def test_a_busy_compute_thread_refuses_to_run_a_call_inline():
    compute = ComputeThread()
    running, release = _occupy(compute)
    assert compute.run_if_idle(lambda: "never") == (False, None)
    release.set()
    assert running.result(10) is True
    compute.shutdown()
    assert compute.run_if_idle(lambda: "never") == (False, None)  # nor one shut down


def test_inference_steps_go_before_forward_and_backward_calls():
    compute = ComputeThread()
    running, release = _occupy(compute)
    ran: list[str] = []
    futures = [
        compute.submit(ran.append, name, priority=priority)
        for name, priority in [("backward", SERVE), ("trace", VERIFY), ("step", INFERENCE)]
    ]
    release.set()
    for future in [running, *futures]:
        future.result(10)
    assert ran == ["step", "backward", "trace"]
    compute.shutdown()


def test_waiting_calls_of_one_key_run_as_one_batch_oldest_first_and_fail_alone():
    compute = ComputeThread()
    batches: list[list[str]] = []

    def run_many(calls: list[tuple]) -> list[tuple[bool, object]]:
        batches.append([name for (name,) in calls])
        return [(False, ValueError(name)) if name == "bad" else (True, name.upper()) for (name,) in calls]

    a, b = Batchable("a", run_many, limit=3), Batchable("b", run_many, limit=3)
    running, release = _occupy(compute)
    names = [("a1", a), ("b1", b), ("bad", a), ("a3", a), ("a4", a), ("alone", None)]
    futures = {
        name: compute.submit(lambda n: f"{n} alone", name, priority=INFERENCE, batch=batch)
        for name, batch in names
    }
    release.set()
    running.result(10)
    assert futures["a1"].result(10) == "A1" and futures["a3"].result(10) == "A3"
    with pytest.raises(ValueError, match="bad"):  # its error is its own: the others in its batch got theirs
        futures["bad"].result(10)
    assert futures["b1"].result(10) == "b1 alone"  # a batch of one runs as the plain call
    assert futures["a4"].result(10) == "a4 alone"
    assert futures["alone"].result(10) == "alone alone"
    assert batches == [["a1", "bad", "a3"]]  # at most `limit`, oldest first; a4 waited for the next turn
    compute.shutdown()
