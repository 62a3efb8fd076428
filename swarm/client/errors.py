"""Errors the client raises."""

from __future__ import annotations

import torch

from swarm.proto import swarm_pb2


class RemoteError(RuntimeError):
    """A node answered with an Error reply."""

    def __init__(self, peer_id: str, error: swarm_pb2.Error):
        self.peer_id, self.code = peer_id, error.code
        super().__init__(f"node {peer_id} refused: {swarm_pb2.Error.Code.Name(error.code)}: {error.message}")


class MissingBlocksError(RuntimeError):
    """No usable node serves some blocks."""

    def __init__(self, missing: list[int]):
        self.missing = missing
        super().__init__(f"no node serves blocks {missing}")


class QuantNotAllowedError(MissingBlocksError):
    """Some blocks are served, but only by nodes whose --quant the client's allowed_quant leaves out."""

    def __init__(self, missing: list[int], served: dict[int, list[str]], allowed: list[str]):
        self.missing, self.served, self.allowed = missing, served, allowed
        kinds = sorted({quant for quants in served.values() for quant in quants})
        RuntimeError.__init__(
            self,
            f"blocks {missing} are served only by nodes with quantized weights ({', '.join(kinds)}), and "
            f"allowed_quant={allowed} rules them out; allow {kinds} or wait for a node of {allowed}",
        )


class RequestRefused(ValueError):
    """A node refused the client's own request (too large for its limits, or malformed): not the node's
    fault, so nobody is banned and nothing is retried; change the request (fewer rows or tokens, a shorter
    session)."""

    def __init__(self, error: RemoteError):
        self.peer_id, self.code = error.peer_id, error.code
        super().__init__(f"{error}; the request itself was refused: send a smaller or valid one")


# what a node's error code says about who failed
REFUSED_REQUEST_CODES = frozenset({swarm_pb2.Error.TOO_LARGE, swarm_pb2.Error.BAD_REQUEST})
# UNKNOWN_BLOCKS: the node no longer serves the blocks (it moved since we read its record)
BUSY_CODES = frozenset({swarm_pb2.Error.OVERLOADED, swarm_pb2.Error.TIMEOUT, swarm_pb2.Error.UNKNOWN_BLOCKS})


def blame(error: BaseException) -> str:
    """Who a failed call is on: "request" (the node refused our own request: raise it to the caller),
    "busy" (the node is overloaded, slow or moved to other blocks: move on, come back soon) or "node" (it
    failed or sent something wrong: ban it)."""
    if isinstance(error, RemoteError) and error.code in REFUSED_REQUEST_CODES:
        return "request"
    if isinstance(error, RemoteError) and error.code in BUSY_CODES:
        return "busy"  # it answered, so it is alive; a node that does not answer at all is banned
    return "node"


def check_finite(peer_id: str, tensors: list[torch.Tensor]) -> None:
    """Raise RemoteError (the node's fault) if a node's reply holds NaN or inf: passed on, it would make the
    next node refuse our request, and the wrong node would be blamed."""
    if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
        raise RemoteError(peer_id, swarm_pb2.Error(message="the reply holds NaN or inf values"))
