"""Calls from the client to one node: forward through part of its span, unary or streamed by size."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import torch
from hivemind.p2p import P2P

from swarm.client.errors import RemoteError, check_finite
from swarm.proto import swarm_pb2
from swarm.protocol import MAX_UNARY_MESSAGE_BYTES, STREAM_CHUNK_BYTES, NodeProtocol
from swarm.utils.streaming import TensorAssembler, split_tensors
from swarm.utils.tensors import FLOAT_DTYPES, deserialize_checked, serialize

MAX_RESPONSE_BYTES = 1024 * 1024 * 1024


def _optional(tensor: torch.Tensor | None):
    return serialize(tensor) if tensor is not None else None


async def get_info(p2p: P2P, peer_id: str, timeout: float) -> swarm_pb2.InfoResponse:
    stub = NodeProtocol.stub(p2p, peer_id)
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
    prompts: torch.Tensor | None = None,
    receipts: list[bytes] | None = None,
) -> torch.Tensor:
    """Hidden states through blocks [start, end) of `peer_id`; raises RemoteError on an error reply.

    `receipts`: if given, the node's signed receipt for its reply is appended (training nodes sign them).
    """
    tensors = [hidden_states] + ([prompts] if prompts is not None else [])
    outputs = await _call(
        p2p, peer_id, "forward", start, end, tensors, attention_mask, position_ids, timeout, receipts=receipts
    )
    _expect_shapes(peer_id, outputs, [hidden_states.shape])
    return outputs[0]


async def remote_backward(
    p2p: P2P,
    peer_id: str,
    start: int,
    end: int,
    hidden_states: torch.Tensor,
    grad_outputs: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    timeout: float,
    prompts: torch.Tensor | None = None,
    receipt: bytes = b"",
    receipts: list[bytes] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients w.r.t. the span's inputs (and its deep prompts); the node recomputes the forward.

    `receipt`: in a training run, the caller's signed receipt for these tensors (`swarm.training.validation`);
    `receipts`: if given, the node's signed receipt for its reply is appended.
    """
    tensors = [hidden_states, grad_outputs] + ([prompts] if prompts is not None else [])
    grads = await _call(
        p2p,
        peer_id,
        "backward",
        start,
        end,
        tensors,
        attention_mask,
        position_ids,
        timeout,
        receipt=receipt,
        receipts=receipts,
        expected_outputs=1 + (prompts is not None),
    )
    shapes = [hidden_states.shape] + ([prompts.shape] if prompts is not None else [])
    _expect_shapes(peer_id, grads, shapes)
    return grads[0], (grads[1] if prompts is not None else None)


async def _call(
    p2p,
    peer_id,
    kind,
    start,
    end,
    tensors,
    attention_mask,
    position_ids,
    timeout,
    receipt: bytes = b"",
    receipts: list[bytes] | None = None,
    expected_outputs: int = 1,
) -> list[torch.Tensor]:
    """A forward or backward call: unary when the request fits one message, streamed otherwise.

    `expected_outputs`: how many tensors a whole reply has (a streamed reply is read until then)."""
    stub = NodeProtocol.stub(p2p, peer_id)
    request_type = swarm_pb2.ForwardRequest if kind == "forward" else swarm_pb2.BackwardRequest
    protos = [serialize(t) for t in tensors]
    request = request_type(
        start_block=start,
        end_block=end,
        attention_mask=_optional(attention_mask),
        position_ids=_optional(position_ids),
    )
    if receipt:
        request.receipt = receipt
    if sum(len(p.buffer) for p in protos) + request.ByteSize() < MAX_UNARY_MESSAGE_BYTES:
        request.tensors.extend(protos)
        response = await getattr(stub, f"rpc_{kind}")(request, timeout=timeout)
        error = response.error if response.HasField("error") else None
        outputs = _decode_outputs(peer_id, error, list(response.tensors))
        if receipts is not None:
            receipts.append(bytes(response.receipt))
        return outputs

    async def requests():
        parts = split_tensors(protos, STREAM_CHUNK_BYTES)
        first = request_type()
        first.CopyFrom(request)
        first.tensors.append(parts[0])
        yield first
        for part in parts[1:]:
            yield request_type(tensors=[part])

    async def collect():
        error, assembler, signed = None, TensorAssembler(MAX_RESPONSE_BYTES), b""
        async with aclosing(await getattr(stub, f"rpc_{kind}_stream")(requests())) as stream:
            async for response in stream:  # closed from this side once the reply is whole
                if response.HasField("error"):
                    error = response.error
                    break
                assembler.extend(response.tensors)
                signed = signed or bytes(response.receipt)
                if assembler.has(expected_outputs):
                    break
        return error, assembler, signed

    error, assembler, signed = await asyncio.wait_for(collect(), timeout=timeout)
    tensors = assembler.finish() if error is None else []
    outputs = _decode_outputs(peer_id, error, tensors)
    if receipts is not None:
        receipts.append(signed)
    return outputs


def _decode_outputs(peer_id: str, error: swarm_pb2.Error | None, tensors: list) -> list[torch.Tensor]:
    if error is not None:
        raise RemoteError(peer_id, error)
    outputs = [
        deserialize_checked(
            t, name="output", allowed_dtypes=FLOAT_DTYPES, ndim=None, max_bytes=MAX_RESPONSE_BYTES
        )
        for t in tensors
    ]
    check_finite(peer_id, outputs)
    return outputs


def _expect_shapes(peer_id: str, tensors: list[torch.Tensor], shapes: list) -> None:
    got = [tuple(t.shape) for t in tensors]
    if got != [tuple(s) for s in shapes]:
        raise RemoteError(peer_id, swarm_pb2.Error(message=f"reply has shapes {got}, expected {shapes}"))
