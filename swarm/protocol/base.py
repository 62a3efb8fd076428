"""A hivemind servicer whose typed rpc_* signatures are the contract for both the server and its clients."""

from __future__ import annotations

import threading
import types

from hivemind.p2p import P2P, PeerID, ServicerBase
from hivemind.p2p.servicer import RPCHandler, StubBase

from swarm.access import membership

# hivemind fills a class's handler list before its stub type: two threads building their first stubs at
# once could see the list and a stub type of None
_COLLECTING = threading.RLock()


class Protocol(ServicerBase):
    """Subclass once per service with SERVICE_NAME and typed rpc_* methods; servers subclass that.

    hivemind names handlers after the class and collects them from whichever class asks first; here the
    protocol class alone decides both, so stubs built from it reach the subclass that serves them, and a
    server registers exactly the declared handlers.
    """

    SERVICE_NAME: str = ""

    @classmethod
    def _protocol(cls) -> type[Protocol]:
        for klass in cls.__mro__:
            if "SERVICE_NAME" in vars(klass) and klass.SERVICE_NAME:
                return klass
        raise TypeError(f"{cls.__name__} declares no SERVICE_NAME")

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        name = f"{cls._protocol().SERVICE_NAME}.{method_name}"
        return name if namespace is None else f"{namespace}::{name}"

    @classmethod
    def _collect_rpc_handlers(cls) -> None:
        with _COLLECTING:
            cls._collect_rpc_handlers_once()

    @classmethod
    def _collect_rpc_handlers_once(cls) -> None:
        protocol = cls._protocol()
        if cls is not protocol:
            protocol._collect_rpc_handlers()
            cls._rpc_handlers, cls._stub_type = protocol._rpc_handlers, protocol._stub_type
            return
        if "_rpc_handlers" in vars(cls) and cls._rpc_handlers is not None:
            return
        cls._rpc_handlers = None  # hivemind's check would otherwise see a base class's list
        super()._collect_rpc_handlers()

    @classmethod
    def _make_rpc_caller(cls, handler: RPCHandler):
        call = super()._make_rpc_caller(handler)

        async def caller(self: StubBase, input, timeout: float | None = None):
            # in a private swarm the request carries this peer's proof of membership (swarm.access)
            return await call(self, membership.prove(self._p2p, input, handler.stream_input), timeout)

        caller.__name__ = handler.method_name
        return caller

    async def add_p2p_handlers(self, p2p: P2P, wrapper=None, *, namespace=None, balanced=False) -> None:
        """Register the handlers; in a private swarm each one first checks the caller's membership."""
        keyring = membership.membership_for(p2p)
        if keyring is not None:
            self._collect_rpc_handlers()
            servicer = self if wrapper is None else wrapper
            wrapper = types.SimpleNamespace(
                **{
                    rpc.method_name: membership.guard(keyring, getattr(servicer, rpc.method_name), rpc)
                    for rpc in self._rpc_handlers
                }
            )
        await super().add_p2p_handlers(p2p, wrapper, namespace=namespace, balanced=balanced)

    @classmethod
    def stub(cls, p2p: P2P, peer_id: str) -> StubBase:
        """A client stub for the peer `peer_id` (base58)."""
        return cls._protocol().get_stub(p2p, PeerID.from_base58(peer_id))
