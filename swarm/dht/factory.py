"""Create hivemind DHT peers that share the swarm's record validators and a key-bound identity."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P
from hivemind.utils.crypto import RSAPrivateKey

from swarm.access import EncryptedRecordValidator, Keyring, load_keyring, register_membership
from swarm.dht.identity import load_or_create_identity, temporary_identity_file
from swarm.dht.records import SwarmRecordValidator
from swarm.dht.relay_limits import NO_RELAY_SERVICE, RelayLimits
from swarm.utils.pipes import BlockingReads

DEFAULT_HOST = "127.0.0.1"


class SwarmDHT(DHT):
    """hivemind's DHT whose background process reads whole messages from its command pipe (see
    `swarm.utils.pipes`): a value above 16 KiB could otherwise kill it."""

    daemon_flags: dict[str, object] = {}  # extra p2pd flags (relay service and caps; see swarm.dht.relay)

    def start_with_flags(self, flags: dict[str, object]) -> None:
        """Start the DHT's process, whose daemon gets these extra p2pd flags."""
        self.daemon_flags = dict(flags)
        self.run_in_background(await_ready=True)

    def run(self) -> None:
        self._inner_pipe = BlockingReads(self._inner_pipe)
        if self.daemon_flags:
            _add_daemon_flags(self.daemon_flags)
        super().run()


def _add_daemon_flags(flags: dict[str, object]) -> None:
    """Give p2pd flags that hivemind's P2P.create has no parameter for (the relay service's caps). Runs in
    the DHT's own process, whose only daemon is this peer's."""
    make_args = P2P._make_process_args

    def with_flags(*args, **kwargs):
        return make_args(*args, **{**kwargs, **flags})

    P2P._make_process_args = staticmethod(with_flags)


def make_validators(signing_key: RSAPrivateKey, keyring: Keyring | None = None) -> list:
    """Validators every swarm peer runs: a peer without them can't read signed records; with a swarm key,
    values are sealed too (swarm.access.records), and a peer without that key reads none of them."""
    validators = [RSASignatureValidator(signing_key), SwarmRecordValidator()]
    return validators + ([EncryptedRecordValidator(keyring)] if keyring is not None else [])


def create_dht(
    initial_peers: Sequence[str] = (),
    *,
    host: str = DEFAULT_HOST,
    port: int = 0,
    identity_path: str | os.PathLike | None = None,
    client_mode: bool = False,
    announce_maddrs: Sequence[str] = (),
    swarm_key: str | os.PathLike | Keyring | None = None,
    relay_service: RelayLimits | None = None,
    listen: bool | None = None,
    **kwargs,
) -> tuple[DHT, RSASignatureValidator]:
    """Start a DHT peer; returns it with the validator whose key signs this peer's records.

    The same RSA key is the libp2p identity (`identity_path`, created if missing; ephemeral if None),
    so the peer id is bound to the key that signs the peer's records. `announce_maddrs` are the
    addresses others should dial instead of the listening one (port forwarding, NAT, a relay).
    `swarm_key`: the private swarm's key file (default: $SWARM_KEY_FILE; neither: a public swarm); its
    records are sealed with it and this peer's RPC calls and handlers prove and require membership.
    `relay_service`: serve as a circuit relay for peers behind NAT, with these caps; such a peer declares
    itself publicly reachable (libp2p starts its relay service only then, and its AutoNAT never says so
    on a private network). None: relay for nobody.
    `listen`: whether the daemon listens on host:port (default: unless `client_mode`); a node behind NAT
    runs its DHT as a client but listens, for the connections its relay brings.
    """
    keyring = swarm_key if isinstance(swarm_key, Keyring) else load_keyring(swarm_key)
    if identity_path is not None:
        key, path, temporary = load_or_create_identity(identity_path), os.fspath(identity_path), False
    else:
        key = RSAPrivateKey()
        path, temporary = temporary_identity_file(key), True
        kwargs.setdefault("check_if_identity_free", False)  # a fresh random key can't be taken already
    validators = make_validators(key, keyring)
    if relay_service is not None:
        kwargs.setdefault("force_reachability", "public")
    flags = relay_service.daemon_flags() if relay_service is not None else NO_RELAY_SERVICE
    try:
        dht = SwarmDHT(
            initial_peers=list(initial_peers),
            start=False,
            client_mode=client_mode,
            host_maddrs=[f"/ip4/{host}/tcp/{port}"]
            if (not client_mode if listen is None else listen)
            else [],
            announce_maddrs=list(announce_maddrs) or None,
            record_validators=validators,
            identity_path=path,
            **kwargs,
        )
        dht.start_with_flags(flags)
    finally:
        if temporary:  # the daemon has read it by now; an ephemeral key never outlives the process on disk
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    register_membership(dht.peer_id.to_base58(), keyring)
    return dht, validators[0]
