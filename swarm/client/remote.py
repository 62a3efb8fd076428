"""Calls from the client to one node: forward through part of its span, unary or streamed by size."""

from __future__ import annotations

import asyncio

import torch
from hivemind.p2p import P2P, PeerID

from swarm.client.errors import RemoteError
from swarm.node.handler import NodeServicer
from swarm.node.limits import MAX_UNARY_MESSAGE_BYTES, STREAM_CHUNK_BYTES
from swarm.proto import swarm_pb2
from swarm.utils.streaming import combine_parts, split_tensors
from swarm.utils.tensors import FLOAT_DTYPES, deserialize_checked, serialize

MAX_RESPONSE_BYTES = 1024 * 1024 * 1024


def _optional(tensor: torch.Tensor | None):
    return serialize(tensor) if tensor is not None else None


async def get_info(p2p: P2P, peer_id: str, timeout: float) -> swarm_pb2.InfoResponse:
    stub = NodeServicer.get_stub(p2p, PeerID.from_base58(peer_id))
    return await stub.rpc_info(swarm_pb2.InfoRequest(), timeout=timeout)


async def remote_forward(
    p2p: P2P,
    peer_id: str,
    start: int,
    end: int,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    timeout: float,
) -> torch.Tensor:
    """Hidden states through blocks [start, end) of `peer_id`; raises RemoteError on an error reply."""
    stub = NodeServicer.get_stub(p2p, PeerID.from_base58(peer_id))
    hidden_proto = serialize(hidden_states)
    request = swarm_pb2.ForwardRequest(
        start_block=start,
        end_block=end,
        attention_mask=_optional(attention_mask),
        position_ids=_optional(position_ids),
    )
    if len(hidden_proto.buffer) + request.ByteSize() < MAX_UNARY_MESSAGE_BYTES:
        request.tensors.append(hidden_proto)
        response = await stub.rpc_forward(request, timeout=timeout)
        return _decode_output(
            peer_id, response.error if response.HasField("error") else None, list(response.tensors)
        )

    async def requests():
        parts = split_tensors([hidden_proto], STREAM_CHUNK_BYTES)
        first = swarm_pb2.ForwardRequest()
        first.CopyFrom(request)
        first.tensors.append(parts[0])
        yield first
        for part in parts[1:]:
            yield swarm_pb2.ForwardRequest(tensors=[part])

    async def collect():
        error, parts = None, []
        async for response in await stub.rpc_forward_stream(requests()):
            if response.HasField("error"):
                error = response.error
            parts.extend(response.tensors)
        return error, parts

    error, parts = await asyncio.wait_for(collect(), timeout=timeout)
    tensors = combine_parts(parts, MAX_RESPONSE_BYTES) if error is None else []
    return _decode_output(peer_id, error, tensors)


def _decode_output(peer_id: str, error: swarm_pb2.Error | None, tensors: list) -> torch.Tensor:
    if error is not None:
        raise RemoteError(peer_id, error)
    if len(tensors) != 1:
        raise RemoteError(peer_id, swarm_pb2.Error(message=f"expected 1 output tensor, got {len(tensors)}"))
    return deserialize_checked(
        tensors[0], name="output", allowed_dtypes=FLOAT_DTYPES, ndim=3, max_bytes=MAX_RESPONSE_BYTES
    )
