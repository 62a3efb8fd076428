"""Message-size limits of the wire, which a sender and a receiver must agree on."""

from __future__ import annotations

# hivemind's daemon caps one unary message at 4 MiB; stay below it with room for the envelope
MAX_UNARY_MESSAGE_BYTES = 4 * 1024 * 1024 - 64 * 1024
# larger requests and replies travel as streams of parts of this size
STREAM_CHUNK_BYTES = 1024 * 1024
