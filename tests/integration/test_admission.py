"""One real node with small caps: sessions and streams per peer and in total, stalled request streams,
and two sessions of one client on one node (#15 item 2)."""

import asyncio
import contextlib
from typing import NamedTuple

import pytest
import torch
from verification_helpers import p2p_client

from swarm.client.errors import RemoteError
from swarm.client.inference import SpanStream
from swarm.client.remote import remote_forward
from swarm.client.routing import RemoteSpan
from swarm.proto import swarm_pb2
from swarm.protocol import NodeProtocol
from swarm.utils.tensors import serialize

HIDDEN = 64
TIMEOUT = 30


@pytest.fixture(scope="module")
def node(tiny_model, tmp_path_factory):
    """A node serving blocks [0, 4): 2 sessions per peer, 3 in all, streams dropped after 1.5 s of silence."""
    from swarm.local import LocalSwarm

    swarm = LocalSwarm(workdir=tmp_path_factory.mktemp("admission-swarm"))
    swarm.start_bootstrap()
    process = swarm.start_node(
        str(tiny_model),
        "0:4",
        "--max-sessions-per-peer",
        "2",
        "--max-sessions",
        "3",
        "--stream-message-timeout",
        "1.5",
        "--update-period",
        "2",
    )
    yield swarm, process
    swarm.close()


class Client(NamedTuple):
    """A client peer of its own (its own peer id) on a background loop."""

    loop: object
    p2p: object


@pytest.fixture
def clients(node):
    swarm, _ = node
    with contextlib.ExitStack() as stack:
        yield [Client(*stack.enter_context(p2p_client(swarm.initial_peers))) for _ in range(2)]


def span_of(process, start=0, end=4):
    return RemoteSpan(process.peer_id, start, end, swarm_pb2.ServerInfo())


def step(client, stream, position=0):
    hidden = torch.randn(1, 2, HIDDEN)
    positions = torch.arange(position, position + 2).unsqueeze(0)
    return client.loop.run(stream.step(hidden, position, None, positions))


def open_session(client, process, session_id, start=0, end=4):
    stream = SpanStream(client.p2p, span_of(process, start, end), session_id, 16, TIMEOUT)
    try:
        step(client, stream)
    except BaseException:
        client.loop.run(stream.close())
        raise
    return stream


def test_sessions_are_capped_per_peer_and_in_total_and_freed_on_close(node, clients):
    _, process = node
    first, second = clients
    mine = [open_session(first, process, f"a{i}") for i in range(2)]
    with pytest.raises(RemoteError) as refused:
        open_session(first, process, "a2")
    assert refused.value.code == swarm_pb2.Error.OVERLOADED and "of yours" in str(refused.value)
    theirs = open_session(second, process, "b0")  # another peer still gets in, up to the total
    with pytest.raises(RemoteError) as full:
        open_session(second, process, "b1")
    assert full.value.code == swarm_pb2.Error.OVERLOADED and "this node has 3" in str(full.value)
    # the sessions that are open keep working
    step(first, mine[0], position=2)
    step(second, theirs, position=2)
    first.loop.run(mine[0].close())
    again = _retry(lambda: open_session(second, process, "b2"))  # a closed session's slot comes back
    step(second, again, position=2)
    first.loop.run(mine[1].close())
    second.loop.run(theirs.close())
    second.loop.run(again.close())


def test_one_client_holds_two_sessions_on_one_node_with_their_own_ids(node, clients):
    _, process = node
    client, _ = clients
    # a route through this node twice (blocks [0, 2) then [2, 4)), each span with its own session id
    low = open_session(client, process, "route.0", 0, 2)
    with pytest.raises(RemoteError) as taken:  # the old scheme: one id for every span of the route
        open_session(client, process, "route.0", 2, 4)
    assert taken.value.code == swarm_pb2.Error.BAD_REQUEST and "already open" in str(taken.value)
    high = _retry(lambda: open_session(client, process, "route.1", 2, 4))
    step(client, low, position=2)
    step(client, high, position=2)
    for stream in (low, high):
        client.loop.run(stream.close())


def test_a_stalled_request_stream_is_dropped_and_the_node_keeps_serving(node, clients):
    _, process = node
    client, _ = clients

    async def stalled_forward():
        async def nothing_then_wait():
            await asyncio.sleep(10)  # opens the stream, never sends a message
            yield swarm_pb2.ForwardRequest()

        stub = NodeProtocol.stub(client.p2p, process.peer_id)
        replies = await stub.rpc_forward_stream(nothing_then_wait())
        return await asyncio.wait_for(anext(replies), 8)

    async def stalled_session():
        async def nothing_then_wait():
            await asyncio.sleep(10)  # never opens its session
            yield swarm_pb2.InferenceRequest()

        stub = NodeProtocol.stub(client.p2p, process.peer_id)
        replies = await stub.rpc_inference(nothing_then_wait())
        return await asyncio.wait_for(anext(replies), 8)

    for stalled in (stalled_forward, stalled_session):
        reply = client.loop.run(stalled())
        assert reply.HasField("error") and reply.error.code == swarm_pb2.Error.TIMEOUT, reply
        assert "no complete stream message" in reply.error.message
    hidden = torch.randn(1, 3, HIDDEN)
    out = client.loop.run(remote_forward(client.p2p, process.peer_id, 0, 4, hidden, None, None, TIMEOUT))
    assert out.shape == hidden.shape and torch.isfinite(out).all()
    assert serialize(out)  # a well-formed reply


def _retry(fn, attempts=20, delay=0.25):
    """The node frees a closed session when its stream handler ends, a moment after the close."""
    import time

    for attempt in range(attempts):
        try:
            return fn()
        except RemoteError as e:
            if e.code != swarm_pb2.Error.OVERLOADED or attempt == attempts - 1:
                raise
            time.sleep(delay)
