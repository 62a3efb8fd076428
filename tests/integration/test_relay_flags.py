"""A peer's relay caps reach its libp2p daemon (hivemind's P2P.create has no parameter for them)."""

import psutil

from swarm.dht.factory import create_dht
from swarm.dht.relay_limits import RelayLimits


def daemon_args(dht) -> list[str]:
    """The command line of the p2pd that the DHT's process started."""
    (daemon,) = [p for p in psutil.Process(dht.pid).children(recursive=True) if p.name() == "p2pd"]
    return daemon.cmdline()


def test_relay_service_caps_are_passed_to_the_daemon_and_off_by_default():
    limits = RelayLimits(max_reservations=7, max_circuits=3, data_limit=2**20, time_limit=90)
    relay, _ = create_dht(relay_service=limits)
    plain, _ = create_dht([str(m) for m in relay.get_visible_maddrs()])
    try:
        args = daemon_args(relay)
        for flag in (
            "-relayService=1",
            "-relayMaxReservations=7",
            "-relayMaxCircuits=3",
            "-relayDataLimit=1048576",
            "-relayTimeLimit=90s",
            "-forceReachabilityPublic=1",
        ):
            assert flag in args
        plain_args = daemon_args(plain)
        assert "-relayService=0" in plain_args and "-forceReachabilityPublic=1" not in plain_args
    finally:
        plain.shutdown()
        relay.shutdown()
