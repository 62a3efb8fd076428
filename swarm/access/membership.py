"""Proofs of membership on every RPC of a private swarm.

The caller adds its proofs (swarm.access.keys.membership_proof: an HMAC of its own peer id under each
accepted swarm key) to the request, or to the first request of a stream, as an extra protobuf field that
no message declares (field PROOF_FIELD; protobuf carries unknown fields through). The node checks them
against the peer id libp2p authenticated for the stream and strips them before its handler sees the
request; a caller without a valid proof gets one reply with error FORBIDDEN and the handler never runs.

Which keyring a P2P instance uses is registered by peer id (swarm.dht.factory does it), so one process
may hold members and outsiders side by side; a peer id without a keyring is public and unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from swarm.access.keys import Keyring
from swarm.proto import swarm_pb2
from swarm.utils.streaming import hold_until_caller_closes
from swarm.utils.varint import encode_varint

PROOF_FIELD = 536_870_001  # near the top of protobuf's field numbers: never a declared field
_WIRE_BYTES = 2
MAX_PROOFS = 4
REFUSAL_HOLD = 5.0  # seconds a refused stream stays open for its caller to read the refusal and close it
REFUSAL = "not a member of this private swarm (start with the swarm's --swarm-key)"

_KEYRINGS: dict[str, Keyring] = {}


def register_membership(peer_id: str, keyring: Keyring | None) -> None:
    """Make the P2P instances of `peer_id` (base58) prove membership on their calls and require it on
    their handlers; None makes them public again."""
    if keyring is None:
        _KEYRINGS.pop(peer_id, None)
    else:
        _KEYRINGS[peer_id] = keyring


def membership_for(p2p) -> Keyring | None:
    return _KEYRINGS.get(p2p.peer_id.to_base58())


def proof_bytes(proofs: list[bytes]) -> bytes:
    """The proofs as serialized occurrences of the undeclared field PROOF_FIELD."""
    tag = encode_varint(PROOF_FIELD << 3 | _WIRE_BYTES)
    return b"".join(tag + encode_varint(len(proof)) + proof for proof in proofs)


def with_proofs(message: Message, proofs: bytes) -> Message:
    """A copy of `message` carrying the proofs (the caller's message is left as it was)."""
    proven = type(message)()
    proven.CopyFrom(message)
    proven.MergeFromString(proofs)
    return proven


def take_proofs(message: Message) -> list[bytes]:
    """The proofs a request carries; the request is left without any unknown field."""
    proofs = [
        field.data
        for field in UnknownFieldSet(message)
        if field.field_number == PROOF_FIELD and field.wire_type == _WIRE_BYTES
    ]
    message.DiscardUnknownFields()
    return proofs[:MAX_PROOFS]


# ---- the caller's side -----------------------------------------------------------------------------------


def prove(p2p, request, stream_input: bool):
    """`request` (a message, or an async iterator of them) with this peer's proofs, if it is a member."""
    keyring = membership_for(p2p)
    if keyring is None:
        return request
    proofs = proof_bytes(keyring.proofs(p2p.peer_id.to_bytes()))
    if not stream_input:
        return with_proofs(request, proofs)
    return _prove_first(request, proofs)


async def _prove_first(requests: AsyncIterator[Message], proofs: bytes) -> AsyncIterator[Message]:
    first = True
    async for request in requests:
        yield with_proofs(request, proofs) if first else request
        first = False


# ---- the node's side -------------------------------------------------------------------------------------


def _refusal(response_type):
    return response_type(error=swarm_pb2.Error(code=swarm_pb2.Error.FORBIDDEN, message=REFUSAL))


def _is_member(keyring: Keyring, request: Message, context) -> bool:
    return keyring.check_proofs(context.remote_id.to_bytes(), take_proofs(request))


def guard(keyring: Keyring, handler: Callable, rpc) -> Callable:
    """`handler` (a bound rpc_* method that hivemind's RPCHandler `rpc` describes) behind a membership
    check."""
    response_type = rpc.response_type

    async def _first(requests):
        async for request in requests:
            return request
        return None

    async def _replay(first, requests):
        yield first
        async for request in requests:
            yield request

    if not rpc.stream_input and not rpc.stream_output:

        async def unary(request, context):
            if not _is_member(keyring, request, context):
                return _refusal(response_type)
            return await handler(request, context)

        return unary

    if not rpc.stream_input:

        async def stream_out(request, context):
            if not _is_member(keyring, request, context):
                yield _refusal(response_type)
                await hold_until_caller_closes(REFUSAL_HOLD)  # so that the reply reaches the caller
                return
            async for reply in handler(request, context):
                yield reply

        return stream_out

    if not rpc.stream_output:

        async def stream_in(requests, context):
            first = await _first(requests)
            if first is None or not _is_member(keyring, first, context):
                return _refusal(response_type)
            return await handler(_replay(first, requests), context)

        return stream_in

    async def streams(requests, context):
        first = await _first(requests)
        if first is None or not _is_member(keyring, first, context):
            yield _refusal(response_type)
            # the caller may still be writing its requests: closing now would break its pipe before it
            # reads the refusal
            await hold_until_caller_closes(REFUSAL_HOLD)
            return
        async for reply in handler(_replay(first, requests), context):
            yield reply

    return streams
