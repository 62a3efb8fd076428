"""Server streams between real hivemind peers end with the caller closing them, and a state download that
is cut short is fetched again.

Background (swarm/utils/streaming.py): a handler that returns first lets the libp2p daemon reset the stream,
which can drop the reply's tail at the caller; servers now hold a finished stream until the caller, which
knows when it has everything, closes it.
"""

import asyncio
import time

import pytest
import torch
from hivemind.p2p import P2P

from swarm.training.state import FETCH_ATTEMPTS, RemoteStateError, TrainState, TrainStateServicer, fetch_state

RUN = "run-hash"


def _state() -> TrainState:
    """Tensors of mixed sizes: several share a message, one spans messages (1 MiB parts)."""
    generator = torch.Generator().manual_seed(0)
    tensors = {f"small{i}": torch.randn(10 + i, generator=generator) for i in range(12)}
    tensors["big"] = torch.randn(700_000, generator=generator)
    tensors["index"] = torch.arange(5, dtype=torch.int64)
    return TrainState(7, tensors)


class _RecordingServicer(TrainStateServicer):
    """The real servicer, noting when each of its streams ends and optionally cutting the first ones short
    after the header (what a reset at the caller looks like)."""

    def __init__(self, state: TrainState, cut_short: int = 0):
        async def get_state(with_optimizer: bool) -> TrainState:
            return state

        super().__init__(RUN, get_state, lambda: (state.step, 0, []))
        self.cut_short, self.calls, self.ended = cut_short, 0, []

    async def rpc_train_state(self, request, context):
        self.calls += 1
        try:
            async for response in super().rpc_train_state(request, context):
                yield response
                if self.calls <= self.cut_short:
                    return
        finally:
            self.ended.append(time.monotonic())


@pytest.fixture
def peers():
    async def start():
        server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        client = await P2P.create(
            host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server.get_visible_maddrs()
        )
        return server, client

    loop = asyncio.new_event_loop()
    server, client = loop.run_until_complete(start())
    yield loop, server, client
    loop.run_until_complete(client.shutdown())
    loop.run_until_complete(server.shutdown())
    loop.close()


def _serve(loop, server, servicer):
    loop.run_until_complete(servicer.add_p2p_handlers(server))


def test_state_arrives_whole_and_the_caller_closes_the_stream(peers):
    loop, server, client = peers
    state = _state()
    servicer = _RecordingServicer(state)
    _serve(loop, server, servicer)

    async def fetch_and_wait():
        fetched = await fetch_state(client, server.peer_id.to_base58(), RUN, True, timeout=30)
        returned = time.monotonic()
        for _ in range(50):  # the server's hold ends when the caller's close reaches it
            if servicer.ended:
                break
            await asyncio.sleep(0.1)
        return fetched, returned

    fetched, returned = loop.run_until_complete(fetch_and_wait())
    assert fetched.hash() == state.hash()
    assert fetched.tensors["index"].dtype == torch.int64
    assert servicer.calls == 1
    assert servicer.ended, "the server still holds the stream after the caller has everything"
    assert servicer.ended[0] - returned < 5  # released by the caller, not by the 120 s limit


def test_a_state_stream_cut_short_is_fetched_again(peers):
    loop, server, client = peers
    state = _state()
    servicer = _RecordingServicer(state, cut_short=1)
    _serve(loop, server, servicer)
    fetched = loop.run_until_complete(fetch_state(client, server.peer_id.to_base58(), RUN, True, timeout=30))
    assert fetched.hash() == state.hash()
    assert servicer.calls == 2


def test_a_peer_that_always_cuts_its_state_short_fails_after_the_last_attempt(peers):
    loop, server, client = peers
    servicer = _RecordingServicer(_state(), cut_short=FETCH_ATTEMPTS)
    _serve(loop, server, servicer)
    with pytest.raises(RemoteStateError, match="sent 0 tensors for 14 names"):
        loop.run_until_complete(fetch_state(client, server.peer_id.to_base58(), RUN, True, timeout=30))
    assert servicer.calls == FETCH_ATTEMPTS


def test_a_state_for_another_run_is_asked_once(peers):
    loop, server, client = peers
    servicer = _RecordingServicer(_state())
    _serve(loop, server, servicer)
    with pytest.raises(RemoteStateError, match="another run"):
        loop.run_until_complete(
            fetch_state(client, server.peer_id.to_base58(), "other-run", True, timeout=30)
        )
    assert servicer.calls == 1


def test_a_peer_that_refuses_its_state_is_asked_once(peers):
    loop, server, client = peers
    servicer = _RecordingServicer(_state())
    servicer.refuse_peer = lambda peer: "banned from this run"
    _serve(loop, server, servicer)
    with pytest.raises(RemoteStateError, match="banned from this run"):
        loop.run_until_complete(fetch_state(client, server.peer_id.to_base58(), RUN, True, timeout=30))
