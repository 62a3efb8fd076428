"""Errors the client raises."""

from __future__ import annotations

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
