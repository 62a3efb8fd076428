"""Create hivemind DHT peers that share the swarm's record validators and persistent identities."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from swarm.dht.records import SwarmRecordValidator

DEFAULT_HOST = "127.0.0.1"


def load_or_create_signing_key(path: str | os.PathLike | None) -> RSAPrivateKey:
    """The RSA key that signs this peer's DHT records: persisted at `path` if given, else ephemeral."""
    if path is None:
        return RSAPrivateKey()
    path = Path(path)
    if path.exists():
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key.__setstate__({"_private_key": path.read_bytes()})  # hivemind's own (pickle) loading path
        return key
    key = RSAPrivateKey()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.to_bytes())
    return key


def make_validators(signing_key: RSAPrivateKey) -> list:
    """Validators every swarm peer runs: a peer without them can't read signed records."""
    return [RSASignatureValidator(signing_key), SwarmRecordValidator()]


def create_dht(
    initial_peers: Sequence[str] = (),
    *,
    host: str = DEFAULT_HOST,
    port: int = 0,
    identity_path: str | os.PathLike | None = None,
    client_mode: bool = False,
    signing_key: RSAPrivateKey | None = None,
    **kwargs,
) -> tuple[DHT, RSASignatureValidator]:
    """Start a DHT peer; returns it with the signature validator whose key signs this peer's records.

    With `identity_path`, the libp2p identity (peer id) lives in that file and the record-signing key in
    `<identity_path>.rsa`, so a restarted node keeps both.
    """
    if signing_key is None:
        signing_key = load_or_create_signing_key(f"{identity_path}.rsa" if identity_path else None)
    validators = make_validators(signing_key)
    host_maddrs = [] if client_mode else [f"/ip4/{host}/tcp/{port}"]
    if identity_path is not None:
        kwargs["identity_path"] = str(identity_path)
    dht = DHT(
        initial_peers=list(initial_peers),
        start=True,
        client_mode=client_mode,
        host_maddrs=host_maddrs,
        record_validators=validators,
        **kwargs,
    )
    return dht, validators[0]
