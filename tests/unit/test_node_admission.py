"""A node's caps on sessions, streams and buffered bytes; a session closed while a step computes."""

import dataclasses
import math
import threading

import pytest

from swarm.node.admission import Admission
from swarm.node.errors import RequestError
from swarm.node.limits import NodeLimits
from swarm.node.sessions import Session, SessionBudget
from swarm.proto import swarm_pb2

LIMITS = NodeLimits(
    max_sessions=3, max_sessions_per_peer=2, max_streams=2, max_streams_per_peer=1, max_buffered_bytes=100
)


def overloaded(attempt) -> RequestError:
    """The OVERLOADED error `attempt()` raises."""
    with pytest.raises(RequestError) as info:
        attempt()
    assert info.value.code == swarm_pb2.Error.OVERLOADED
    return info.value


def enter(slot) -> None:
    with slot:
        pass


def test_sessions_per_peer_and_in_total_come_back_when_closed():
    admission = Admission(LIMITS)
    with admission.session("a"), admission.session("a"):
        overloaded(lambda: enter(admission.session("a")))
        with admission.session("b"):
            assert "this node has 3" in str(overloaded(lambda: enter(admission.session("c"))))
            assert admission.counts()[0] == 3
    assert admission.counts() == (0, 0, 0)
    with admission.session("c"):
        assert admission.counts()[0] == 1


def test_a_failure_inside_a_slot_gives_it_back():
    admission = Admission(LIMITS)
    with pytest.raises(ValueError):
        with admission.stream("a"):
            raise ValueError("the request was bad")
    with admission.stream("a"), admission.stream("b"):
        overloaded(lambda: enter(admission.stream("c")))
    assert admission.counts() == (0, 0, 0)


def test_buffered_bytes_are_shared_by_every_stream_and_given_back():
    admission = Admission(LIMITS)
    first, second = admission.buffer(), admission.buffer()
    first.take(60)
    overloaded(lambda: second.take(41))
    second.take(40)
    assert admission.counts()[2] == 100
    first.close()
    first.close()  # idempotent
    second.take(60)
    with second:
        pass
    assert admission.counts()[2] == 0


def test_limits_must_be_positive():
    for name in ("max_sessions", "max_streams_per_peer", "max_buffered_bytes", "stream_message_timeout"):
        for bad in (0, -1, math.nan):
            with pytest.raises(ValueError, match=name):
                dataclasses.replace(NodeLimits(), **{name: bad})


def test_a_session_closed_while_a_step_computes_keeps_its_tokens_until_the_step_ends():
    budget = SessionBudget(100)
    session = Session("s", 0, 2, slice(0, 2), max_length=10, owner="peer")
    budget.register(session)
    budget.reserve(session, 4)
    assert budget.tokens_left == 60
    started, finish = threading.Event(), threading.Event()

    def compute():
        with budget.computing(session):
            session.cache = object()  # the step writes into the cache
            started.set()
            finish.wait(5)

    thread = threading.Thread(target=compute)
    thread.start()
    assert started.wait(5)
    budget.release(session)  # e.g. the request timed out: the handler gives up on the session
    assert budget.tokens_left == 60 and session.cache is not None and budget.num_sessions == 1
    finish.set()
    thread.join(5)
    assert budget.tokens_left == 100 and session.cache is None and budget.num_sessions == 0
    with pytest.raises(RequestError, match="closed"):  # a step queued behind it never starts
        with budget.computing(session):
            pass


def test_sessions_of_different_peers_may_share_an_id():
    budget = SessionBudget(100)
    mine, theirs = (Session("same", 0, 2, slice(0, 2), 10, owner=o) for o in ("me", "them"))
    budget.register(mine)
    budget.register(theirs)
    with pytest.raises(RequestError, match="already open"):
        budget.register(Session("same", 0, 2, slice(0, 2), 10, owner="me"))
    budget.release(mine)
    budget.release(theirs)
    assert budget.num_sessions == 0
