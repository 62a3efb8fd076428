"""Unsigned LEB128 varints, as protobuf and multiaddr encode lengths, tags and codes."""

from __future__ import annotations


def encode_varint(value: int) -> bytes:
    """`value` (>= 0) as a varint: 7 bits per byte, low bits first, the high bit set on all but the last."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
