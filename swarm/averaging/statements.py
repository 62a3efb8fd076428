"""Signed statements: what a peer said, provable to anyone who was not there.

A statement is a msgpack map signed with the peer's RSA identity key (the one its libp2p peer id is the
hash of), shipped as `msgpack([payload bytes, public key, signature])`. Anyone can check who signed it
and that nobody changed it, so a statement can be relayed as evidence: two statements by the same peer
about the same slot with different contents prove that the peer equivocated.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import msgpack
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarm.dht.identity import peer_id_from_owner_marker

MAX_STATEMENT_BYTES = 256 * 1024  # commitments of a 100M-value model fit; anything bigger is refused unread


class InvalidStatement(ValueError):
    """A statement that does not parse or whose signature does not verify."""


def signing_key_of(validator: RSASignatureValidator) -> RSAPrivateKey:
    """The private key behind a DHT signature validator (the peer's identity key)."""
    return validator._private_key  # hivemind keeps no public accessor for it


def sign_statement(key: RSAPrivateKey, payload: dict[str, Any]) -> bytes:
    """Sign `payload` (a msgpack-able map) with `key`; returns the statement's bytes."""
    body = msgpack.packb(payload, use_bin_type=True)
    return msgpack.packb([body, _public_bytes(key), key.sign(body)], use_bin_type=True)


# a round signs and checks hundreds of statements by the same few keys: parsing or serializing an SSH
# public key costs more than an RSA signature check
@functools.lru_cache(maxsize=64)
def _public_bytes(key: RSAPrivateKey) -> bytes:
    return key.get_public_key().to_bytes()


@functools.lru_cache(maxsize=4096)
def _public_key(public: bytes) -> RSAPublicKey:
    return RSAPublicKey.from_bytes(public)


def open_statement(blob: bytes) -> tuple[str, dict[str, Any]]:
    """Verify a statement; returns (signer's peer id, payload). Raises InvalidStatement."""
    if not isinstance(blob, bytes) or len(blob) > MAX_STATEMENT_BYTES:
        raise InvalidStatement("a statement must be at most 256 KiB of bytes")
    try:
        body, public, signature = msgpack.unpackb(blob, raw=False)
        payload = msgpack.unpackb(body, raw=False, strict_map_key=False)
        key = _public_key(public)
        valid = key.verify(body, signature)
    except Exception as e:
        raise InvalidStatement(f"unreadable statement: {e!r}") from None
    if not valid:
        raise InvalidStatement("the signature does not match the statement")
    if not isinstance(payload, dict):
        raise InvalidStatement("a statement's payload must be a map")
    signer = peer_id_from_owner_marker(b"[owner:" + public + b"]")
    if signer is None:
        raise InvalidStatement("the statement's key is not an RSA identity")
    return signer, payload


def expect(blob: bytes, signer: str | None = None, **fields: Any) -> dict[str, Any]:
    """Open a statement and check its signer and fields; returns the payload. Raises InvalidStatement."""
    who, payload = open_statement(blob)
    if signer is not None and who != signer:
        raise InvalidStatement(f"signed by {who}, expected {signer}")
    for name, value in fields.items():
        if payload.get(name) != value:
            raise InvalidStatement(f"{name} is {payload.get(name)!r}, expected {value!r}")
    return payload


def digest(data: bytes) -> bytes:
    """sha256 of bytes (the hash every commitment uses)."""
    return hashlib.sha256(data).digest()
