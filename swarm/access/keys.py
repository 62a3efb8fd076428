"""Swarm key files: the current 256-bit key and, after a rotation, the previous one with its grace deadline.

The file is JSON readable only by its owner:
    {"swarm_key": 1, "current": "<base64>", "previous": "<base64>", "previous_until": <unix time>}
A Keyring reads it and re-reads it when it changes on disk (checked at most once a second), so members of a
running swarm switch to a rotated key without a restart: they write with the new key at once and accept
the previous one until `previous_until`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

SWARM_KEY_ENV = "SWARM_KEY_FILE"  # `--swarm-key FILE` sets it; every peer created in the process uses it
FORMAT_VERSION = 1
KEY_BYTES = 32
KEY_ID_BYTES = 4
RELOAD_PERIOD = 1.0  # seconds between checks of the key file for a rotation
_PROOF_LABEL = b"swarm-member\x00"


class SwarmKeyError(ValueError):
    """A swarm key file that is missing, malformed or holds a bad key."""


def key_id(key: bytes) -> bytes:
    """A short public tag naming a key, so a reader knows which key sealed a value."""
    return hashlib.sha256(b"swarm-key-id\x00" + key).digest()[:KEY_ID_BYTES]


@dataclass(frozen=True)
class KeySet:
    current: bytes
    previous: bytes | None = None
    previous_until: float = 0.0

    def accepted(self, now: float | None = None) -> list[bytes]:
        """Keys a value or proof may be made with now: the current one, and the previous one in its grace."""
        now = time.time() if now is None else now
        keep_previous = self.previous is not None and now < self.previous_until
        return [self.current, self.previous] if keep_previous else [self.current]

    def to_json(self) -> dict:
        data: dict = {"swarm_key": FORMAT_VERSION, "current": base64.b64encode(self.current).decode()}
        if self.previous is not None:
            data["previous"] = base64.b64encode(self.previous).decode()
            data["previous_until"] = self.previous_until
        return data


def _decode_key(text, path, name: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except Exception:
        raise SwarmKeyError(f"{path}: {name!r} is not base64") from None
    if len(key) != KEY_BYTES:
        raise SwarmKeyError(f"{path}: {name!r} must be {KEY_BYTES} bytes, got {len(key)}")
    return key


def read_key_file(path: str | os.PathLike) -> KeySet:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SwarmKeyError(
            f"swarm key file {path} does not exist (make one with `swarm keys init`)"
        ) from None
    except (OSError, ValueError) as e:
        raise SwarmKeyError(f"{path}: not a swarm key file ({e})") from None
    if not isinstance(data, dict) or data.get("swarm_key") != FORMAT_VERSION or "current" not in data:
        raise SwarmKeyError(
            f"{path}: not a swarm key file (expected swarm_key: {FORMAT_VERSION} and current)"
        )
    current = _decode_key(data["current"], path, "current")
    if "previous" not in data:
        return KeySet(current)
    until = data.get("previous_until")
    if not isinstance(until, int | float):
        raise SwarmKeyError(f"{path}: a previous key needs previous_until (unix time)")
    return KeySet(current, _decode_key(data["previous"], path, "previous"), float(until))


def _write_key_file(path: str | os.PathLike, keys: KeySet, *, overwrite: bool) -> None:
    """Write readable by the owner only; a rotation replaces the file atomically (readers never see half)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise SwarmKeyError(f"{path} exists already: a new key there would lock its swarm out")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(keys.to_json(), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def create_key_file(path: str | os.PathLike) -> KeySet:
    """A new swarm key at `path` (which must not exist)."""
    keys = KeySet(secrets.token_bytes(KEY_BYTES))
    _write_key_file(path, keys, overwrite=False)
    return keys


def rotate_key_file(path: str | os.PathLike, grace: float, out: str | os.PathLike | None = None) -> KeySet:
    """Replace the key at `path` (or write to `out`) by a new one; the old one stays accepted for `grace`
    seconds."""
    if grace < 0:
        raise SwarmKeyError(f"the grace period must be non-negative, got {grace}")
    old = read_key_file(path)
    keys = KeySet(secrets.token_bytes(KEY_BYTES), old.current, time.time() + grace)
    _write_key_file(out if out is not None else path, keys, overwrite=True)
    return keys


class Keyring:
    """The keys of one swarm, from a key file it re-reads after a rotation (or fixed, without a path)."""

    def __init__(self, keys: KeySet, path: str | os.PathLike | None = None):
        self.path = os.fspath(path) if path is not None else None
        self._keys = keys
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Keyring:
        return cls(read_key_file(path), path)

    def _file_stamp(self):
        if self.path is None:
            return None
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def keys(self) -> KeySet:
        """The keys now, re-read if the file changed (a broken or missing file keeps the last good keys)."""
        if self.path is not None and time.monotonic() - self._checked >= RELOAD_PERIOD:
            self._checked = time.monotonic()
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._stamp:
                try:
                    self._keys = read_key_file(self.path)
                    self._stamp = stamp
                except SwarmKeyError:
                    pass  # half-copied by hand: try again on the next check
        return self._keys

    def write_key(self) -> bytes:
        return self.keys().current

    def accepted(self) -> list[bytes]:
        return self.keys().accepted()

    def proofs(self, peer_id: bytes) -> list[bytes]:
        """This peer's proofs of membership, one per accepted key (a peer that has only one of them, in
        the middle of a rotation, still finds its own)."""
        return [membership_proof(key, peer_id) for key in self.accepted()]

    def check_proofs(self, peer_id: bytes, proofs: list[bytes]) -> bool:
        expected = self.proofs(peer_id)
        return any(hmac.compare_digest(proof, want) for proof in proofs for want in expected)

    def __getstate__(self):
        return {"path": self.path, "keys": self._keys}

    def __setstate__(self, state):
        self.__init__(state["keys"], state["path"])


def membership_proof(key: bytes, peer_id: bytes) -> bytes:
    """HMAC-SHA256 of the peer id under the swarm key: only a member can make it, and it proves membership
    only for that peer id, which libp2p authenticates on every stream (so a copied proof is useless)."""
    return hmac.new(key, _PROOF_LABEL + peer_id, hashlib.sha256).digest()


def load_keyring(path: str | os.PathLike | None = None) -> Keyring | None:
    """The keyring of `path`, or of $SWARM_KEY_FILE when None; None when neither names one (public)."""
    path = path if path is not None else os.environ.get(SWARM_KEY_ENV) or None
    return Keyring.from_file(path) if path is not None else None
