"""Flood (#15): 200 concurrent sessions and 50 stalled streams against one node with its default caps.
The flooding peers are refused fairly (each gets its per-peer share, the rest OVERLOADED or TIMEOUT at
once), the node's memory stays bounded, and a well-behaved client is served meanwhile."""

import asyncio

import psutil
import pytest
import torch

from swarm.client.errors import RemoteError
from swarm.client.inference import SpanStream
from swarm.client.remote import get_info, remote_forward
from swarm.client.routing import RemoteSpan
from swarm.dht.factory import create_dht
from swarm.node.limits import NodeLimits
from swarm.proto import swarm_pb2
from swarm.protocol import NodeProtocol
from swarm.utils.aio import BackgroundLoop

pytestmark = pytest.mark.slow

HIDDEN = 64
SESSIONS, STALLED = 200, 50
OPENING = 32  # session opens in flight at once
DEFAULTS = NodeLimits()
MEMORY_GROWTH = 400 * 2**20


class Peer:
    """A client peer of its own on a background loop."""

    def __init__(self, swarm):
        self.loop = BackgroundLoop()
        self.dht, _ = create_dht(swarm.initial_peers, client_mode=True)
        self.p2p = self.loop.run(self.dht.replicate_p2p())

    def close(self):
        self.loop.run(self.p2p.shutdown())
        self.dht.shutdown()
        self.loop.close()


async def open_session(p2p, peer_id: str, session_id: str) -> SpanStream | RemoteError:
    # 64 sessions' first steps queue on one node: generous for a loaded 2-core machine
    stream = SpanStream(p2p, RemoteSpan(peer_id, 0, 4, swarm_pb2.ServerInfo()), session_id, 16, 150)
    try:
        await stream.step(torch.randn(1, 2, HIDDEN), 0, None, torch.arange(2).unsqueeze(0))
        return stream
    except RemoteError as e:
        await stream.close()
        return e


async def stalled_stream(p2p, peer_id: str) -> swarm_pb2.ForwardResponse:
    async def never():
        await asyncio.sleep(60)
        yield swarm_pb2.ForwardRequest()

    replies = await NodeProtocol.stub(p2p, peer_id).rpc_forward_stream(never())
    try:
        return await asyncio.wait_for(anext(replies), 30)
    finally:
        await replies.aclose()


def test_a_flood_is_refused_fairly_and_a_good_client_is_served(tiny_model, local_swarm):
    local_swarm.start_bootstrap()
    node = local_swarm.start_node(
        str(tiny_model), "0:4", "--stream-message-timeout", "5", "--update-period", "2"
    )
    flooder, staller, good = (Peer(local_swarm) for _ in range(3))
    try:
        memory_before = psutil.Process(node.pid).memory_info().rss

        async def flood():
            # every attempt is made while the held sessions stay open, OPENING at a time: with all 200 (and
            # the 50 stalled streams) opened in one burst, one CI run had a stream whose first reply never
            # came within 150 s, a loss in the P2P daemons' stream setup that this test is not about
            opening = asyncio.Semaphore(OPENING)

            async def attempt(i: int):
                async with opening:
                    return await open_session(flooder.p2p, node.peer_id, f"f{i}")

            return await asyncio.gather(*(attempt(i) for i in range(SESSIONS)))

        async def stall():
            return await asyncio.gather(*(stalled_stream(staller.p2p, node.peer_id) for _ in range(STALLED)))

        flooding = asyncio.run_coroutine_threadsafe(flood(), flooder.loop.loop)
        stalling = asyncio.run_coroutine_threadsafe(stall(), staller.loop.loop)
        opened = flooding.result(180)
        held = [s for s in opened if isinstance(s, SpanStream)]
        refused = [e for e in opened if isinstance(e, RemoteError)]
        # fair: the flooder got exactly its per-peer share; every other attempt was refused as OVERLOADED
        assert len(held) == DEFAULTS.max_sessions_per_peer, [str(e) for e in refused[:3]]
        assert len(refused) == SESSIONS - len(held)
        assert all(e.code == swarm_pb2.Error.OVERLOADED for e in refused), {str(e) for e in refused}

        # while the flood holds its sessions and the stalled streams wait: a good client is served
        hidden = torch.randn(1, 3, HIDDEN)
        out = good.loop.run(remote_forward(good.p2p, node.peer_id, 0, 4, hidden, None, None, 60))
        assert out.shape == hidden.shape
        session = good.loop.run(open_session(good.p2p, node.peer_id, "good"))
        assert isinstance(session, SpanStream), session
        good.loop.run(session.step(torch.randn(1, 1, HIDDEN), 2, None, torch.tensor([[2]])))

        replies = stalling.result(60)
        codes = sorted({swarm_pb2.Error.Code.Name(r.error.code) for r in replies})
        # each stalled stream was dropped (TIMEOUT) or refused past the per-peer stream cap (OVERLOADED)
        assert all(r.HasField("error") for r in replies) and set(codes) <= {"TIMEOUT", "OVERLOADED"}, codes
        timeouts = sum(r.error.code == swarm_pb2.Error.TIMEOUT for r in replies)
        # at least its share waited out the timeout; the rest were refused at once (or took a freed slot)
        assert DEFAULTS.max_streams_per_peer <= timeouts < STALLED, codes

        grown = psutil.Process(node.pid).memory_info().rss - memory_before
        assert grown < MEMORY_GROWTH, f"the node's memory grew by {grown / 2**20:.0f} MiB"
        for stream in held:
            flooder.loop.run(stream.close())
        good.loop.run(session.close())
        # every session's cache tokens come back once the streams are closed
        for _ in range(40):
            info = good.loop.run(get_info(good.p2p, node.peer_id, 30))
            if info.server.cache_tokens_left == DEFAULTS.cache_tokens:
                break
            good.loop.run(asyncio.sleep(0.25))
        assert info.server.cache_tokens_left == DEFAULTS.cache_tokens
        assert node.alive()
    finally:
        for peer in (flooder, staller, good):
            peer.close()
