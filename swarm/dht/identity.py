"""One RSA key per peer: it is the libp2p identity (so it fixes the peer id) and signs the peer's DHT records.

Because the peer id is the hash of that key, a validator can check that a record's claimed peer id
belongs to the key that signed it: no peer can announce itself under another's id.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import tempfile
from pathlib import Path

import base58
import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey


def _key_from_der(der: bytes) -> RSAPrivateKey:
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": der})  # hivemind's own unpickling path
    return key


def load_identity(path: str | os.PathLike) -> RSAPrivateKey:
    """Read a libp2p identity file (protobuf PrivateKey holding an RSA DER key)."""
    message = crypto_pb2.PrivateKey.FromString(Path(path).read_bytes())
    if message.key_type != crypto_pb2.KeyType.RSA:
        raise ValueError(f"{path}: only RSA identities are supported, got key type {message.key_type}")
    return _key_from_der(message.data)


def write_identity(path: str | os.PathLike, key: RSAPrivateKey) -> None:
    """Write `key` as a libp2p identity file readable only by its owner."""
    data = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=key.to_bytes()).SerializeToString()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def load_or_create_identity(path: str | os.PathLike) -> RSAPrivateKey:
    """The identity stored at `path`, created there first if missing."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_identity(path, RSAPrivateKey())
    return load_identity(path)


def temporary_identity_file(key: RSAPrivateKey) -> str:
    """Write an ephemeral identity to a private temp file (the caller deletes it once the daemon read it)."""
    directory = tempfile.mkdtemp(prefix="swarm-identity-")
    path = os.path.join(directory, "identity.key")
    write_identity(path, key)
    return path


def _peer_id_from_der_public_key(der: bytes) -> str:
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return base58.b58encode(digest).decode()


@functools.lru_cache(maxsize=4096)
def peer_id_from_owner_marker(marker: bytes) -> str | None:
    """The libp2p peer id of the RSA key in an "[owner:ssh-rsa ...]" marker (None if it isn't one)."""
    if not (marker.startswith(b"[owner:") and marker.endswith(b"]")):
        return None
    try:
        public_key = serialization.load_ssh_public_key(marker[len(b"[owner:") : -1])
        der = public_key.public_bytes(
            encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, TypeError, base64.binascii.Error):
        return None
    return _peer_id_from_der_public_key(der)


def owner_marker(key: RSAPrivateKey) -> bytes:
    """The "[owner:...]" marker hivemind's RSASignatureValidator uses for this key."""
    return b"[owner:" + key.get_public_key().to_bytes() + b"]"


def peer_id_of(key: RSAPrivateKey) -> str:
    """The libp2p peer id a daemon started with this key gets."""
    return peer_id_from_owner_marker(owner_marker(key))
