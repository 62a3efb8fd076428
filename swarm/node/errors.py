"""Errors a node turns into Error replies (the node keeps serving)."""

from __future__ import annotations

import logging

from hivemind.p2p import P2PContext

from swarm.proto import swarm_pb2
from swarm.utils.tensors import BadTensorError, TensorTooLargeError


class RequestError(Exception):
    """A request the node refuses, with the code the client sees."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def to_error_proto(exc: BaseException) -> swarm_pb2.Error:
    if isinstance(exc, RequestError):
        return swarm_pb2.Error(code=exc.code, message=str(exc))
    if isinstance(exc, BadTensorError):
        code = (
            swarm_pb2.Error.TOO_LARGE if isinstance(exc, TensorTooLargeError) else swarm_pb2.Error.BAD_REQUEST
        )
        return swarm_pb2.Error(code=code, message=str(exc))
    if isinstance(exc, TimeoutError):
        return swarm_pb2.Error(code=swarm_pb2.Error.TIMEOUT, message="request timed out on the node")
    return swarm_pb2.Error(code=swarm_pb2.Error.INTERNAL, message=f"{type(exc).__name__}: {exc}")


def error_reply(response_type, exc: BaseException, context: P2PContext, what: str, logger: logging.Logger):
    """`response_type(error=...)` for a refused request; logged as an error only if the node failed."""
    error = to_error_proto(exc)
    internal = error.code == swarm_pb2.Error.INTERNAL
    level = logging.ERROR if internal else logging.INFO
    logger.log(level, "%s from %s refused: %s", what, context.remote_id, error.message, exc_info=internal)
    return response_type(error=error)
