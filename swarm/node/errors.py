"""Errors a node turns into Error replies (the node keeps serving)."""

from __future__ import annotations

import logging
import secrets

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
    # the exception's text stays in the node's log: it may show paths, internals or other clients' data
    return swarm_pb2.Error(
        code=swarm_pb2.Error.INTERNAL, message=f"internal error {secrets.token_hex(4)} (in the node's log)"
    )


def error_reply(response_type, exc: BaseException, context: P2PContext, what: str, logger: logging.Logger):
    """`response_type(error=...)` for a refused request; logged as an error only if the node failed (with the
    exception and the incident id the caller got)."""
    error = to_error_proto(exc)
    internal = error.code == swarm_pb2.Error.INTERNAL
    level = logging.ERROR if internal else logging.INFO
    detail = f"{error.message}: {type(exc).__name__}: {exc}" if internal else error.message
    logger.log(level, "%s from %s refused: %s", what, context.remote_id, detail, exc_info=internal)
    return response_type(error=error)
