"""Per-request limits a node enforces and advertises."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NodeLimits:
    """Requests above any of these get a TOO_LARGE error reply; none is ever allocated first."""

    max_batch_size: int = 64
    max_sequence_length: int = 8192
    max_request_bytes: int = 256 * 1024 * 1024
    request_timeout: float = 180.0
    cache_tokens: int = 32768  # KV-cache budget: sum over open sessions of batch x max_length
    session_timeout: float = 300.0  # an inference session idle this long is closed and its cache freed
    max_sessions: int = 512  # open inference sessions, all peers together
    max_sessions_per_peer: int = 64
    max_streams: int = 128  # streamed forward/backward calls in progress, all peers together
    max_streams_per_peer: int = 16
    max_buffered_bytes: int = 1024 * 1024 * 1024  # request bytes held across all streams at once
    stream_message_timeout: float = 30.0  # a request stream with no complete message this long is dropped
    decode_batch: int = 1  # one-token steps of up to this many sessions run as one call (1: each alone)

    def __post_init__(self):
        for name, value in vars(self).items():
            if not value > 0:  # NaN fails too
                raise ValueError(f"{name} must be > 0, got {value}")

    def to_proto(self):
        """The limits as advertised in rpc_info."""
        # the proto pulls in hivemind; keep `swarm --help` fast
        from swarm.proto import swarm_pb2
        from swarm.protocol import MAX_UNARY_MESSAGE_BYTES

        return swarm_pb2.Limits(
            max_batch_size=self.max_batch_size,
            max_sequence_length=self.max_sequence_length,
            max_request_bytes=self.max_request_bytes,
            request_timeout=self.request_timeout,
            max_message_bytes=MAX_UNARY_MESSAGE_BYTES,
            cache_tokens=self.cache_tokens,
            session_timeout=self.session_timeout,
        )
