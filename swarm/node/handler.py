"""Typed hivemind P2P handlers of a node. Every failure becomes an Error reply; the node keeps serving."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable

from hivemind.p2p import P2PContext, ServicerBase

from swarm.node.backend import SpanBackend
from swarm.node.errors import RequestError, to_error_proto
from swarm.node.limits import MAX_UNARY_MESSAGE_BYTES, STREAM_CHUNK_BYTES
from swarm.proto import swarm_pb2
from swarm.utils.streaming import combine_parts, split_tensors
from swarm.utils.tensors import serialize

logger = logging.getLogger(__name__)

# bounded so a peer can't keep a stream open forever by trickling parts
MAX_STREAM_MESSAGES = 4096


class NodeServicer(ServicerBase):
    """rpc_info, rpc_forward (unary, < 4 MiB) and rpc_forward_stream (any size up to the node's limit)."""

    def __init__(
        self,
        backend: SpanBackend,
        get_server_info: Callable[[], swarm_pb2.ServerInfo],
        model_info: swarm_pb2.ModelInfo,
    ):
        self.backend, self.get_server_info, self.model_info = backend, get_server_info, model_info

    async def rpc_info(self, request: swarm_pb2.InfoRequest, context: P2PContext) -> swarm_pb2.InfoResponse:
        return swarm_pb2.InfoResponse(
            server=self.get_server_info(), limits=self.backend.limits.to_proto(), model=self.model_info
        )

    async def rpc_forward(
        self, request: swarm_pb2.ForwardRequest, context: P2PContext
    ) -> swarm_pb2.ForwardResponse:
        started = time.perf_counter()
        try:
            outputs = await self._forward(request, list(request.tensors))
            response = swarm_pb2.ForwardResponse(tensors=[serialize(outputs)])
            if response.ByteSize() > MAX_UNARY_MESSAGE_BYTES:
                raise RequestError(
                    swarm_pb2.Error.TOO_LARGE,
                    "response exceeds the unary message limit; use rpc_forward_stream",
                )
            return response
        except Exception as e:
            return self._error_reply(swarm_pb2.ForwardResponse, e, context, "forward")
        finally:
            logger.debug("rpc_forward took %.1f ms", 1000 * (time.perf_counter() - started))

    async def rpc_forward_stream(
        self, requests: AsyncIterator[swarm_pb2.ForwardRequest], context: P2PContext
    ) -> AsyncIterator[swarm_pb2.ForwardResponse]:
        try:
            first, parts = await self._receive_stream(requests)
            outputs = await self._forward(first, parts)
            for part in split_tensors([serialize(outputs)], STREAM_CHUNK_BYTES):
                yield swarm_pb2.ForwardResponse(tensors=[part])
        except Exception as e:
            yield self._error_reply(swarm_pb2.ForwardResponse, e, context, "forward_stream")

    async def _receive_stream(self, requests: AsyncIterator) -> tuple:
        first, parts, count, total = None, [], 0, 0
        limit = self.backend.limits.max_request_bytes
        async for message in requests:
            count += 1
            if count > MAX_STREAM_MESSAGES:
                raise RequestError(
                    swarm_pb2.Error.TOO_LARGE, f"more than {MAX_STREAM_MESSAGES} stream messages"
                )
            first = first or message
            for part in message.tensors:
                total += len(part.buffer)
                if total > limit:
                    raise RequestError(
                        swarm_pb2.Error.TOO_LARGE,
                        f"streamed request exceeds the limit of {limit} bytes",
                    )
                parts.append(part)
        if first is None:
            raise RequestError(swarm_pb2.Error.BAD_REQUEST, "empty request stream")
        return first, combine_parts(parts, self.backend.limits.max_request_bytes)

    async def _forward(self, request, tensors):
        inputs = self.backend.parse_inputs(
            request.start_block,
            request.end_block,
            tensors,
            request.attention_mask if request.HasField("attention_mask") else None,
            request.position_ids if request.HasField("position_ids") else None,
        )
        return await self.backend.forward(inputs)

    @staticmethod
    def _error_reply(response_type, exc: BaseException, context: P2PContext, what: str):
        error = to_error_proto(exc)
        level = logging.ERROR if error.code == swarm_pb2.Error.INTERNAL else logging.INFO
        logger.log(
            level,
            "%s from %s refused: %s",
            what,
            context.remote_id,
            error.message,
            exc_info=error.code == swarm_pb2.Error.INTERNAL,
        )
        return response_type(error=error)
