"""Stubs of a protocol can be built from several threads at once (each client loop builds its own)."""

import inspect
import threading
import time

import hivemind.p2p.servicer as servicer
from hivemind.p2p import P2PContext, PeerID

from swarm.proto import swarm_pb2
from swarm.protocol.base import Protocol


def test_first_stubs_built_by_two_threads_at_once_both_work(monkeypatch):
    class EchoProtocol(Protocol):
        SERVICE_NAME = "Echo"

        async def rpc_echo(
            self, request: swarm_pb2.InfoRequest, context: P2PContext
        ) -> swarm_pb2.InfoResponse:
            raise NotImplementedError

    slow_getmembers = inspect.getmembers

    def getmembers(*args, **kwargs):  # widens the window between hivemind's two assignments
        found = slow_getmembers(*args, **kwargs)
        time.sleep(0.2)
        return found

    monkeypatch.setattr(servicer.inspect, "getmembers", getmembers)
    peer = PeerID.from_base58("QmWHo8eFgDiXudLnGcN5vBipAhEkigyfgeHoiAtx7GeX4V").to_base58()
    stubs, errors = [], []

    def build():
        try:
            stubs.append(EchoProtocol.stub(None, peer))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(10)
    assert errors == [] and len(stubs) == 4
    assert all(callable(stub.rpc_echo) for stub in stubs)
