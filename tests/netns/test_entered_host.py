"""A thread entered into a host starts processes on that host's network, and comes back."""

import os

import pytest

from swarm.dht.factory import create_dht
from swarm.testing.netns import NetnsHarness, unavailable_reason

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(unavailable_reason() is not None, reason=f"netns harness: {unavailable_reason()}"),
]


def own_network() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def test_dhts_started_from_entered_hosts_listen_there_and_reach_each_other(tmp_path):
    machine = own_network()
    dhts = []
    with NetnsHarness(workdir=tmp_path / "netns") as harness:
        harness.add_host("a")
        harness.add_host("b", rate_mbit=100)
        try:
            with harness.entered("a") as host_a:
                assert own_network() != machine
                dhts.append(create_dht(host=host_a.address)[0])
            assert own_network() == machine
            maddrs = [str(m) for m in dhts[0].get_visible_maddrs()]
            assert maddrs and all(f"/ip4/{host_a.address}/" in m for m in maddrs)
            with harness.entered("b") as host_b:
                dhts.append(create_dht(maddrs, host=host_b.address)[0])
            assert own_network() == machine
            assert dhts[1].store("entered-key", b"across the bridge", expiration_time=_in(60))
            found = dhts[0].get("entered-key", latest=True)
            assert found is not None and found.value == b"across the bridge"
            with pytest.raises(KeyError):
                with harness.entered("nowhere"):
                    pass
            assert own_network() == machine
        finally:
            for dht in reversed(dhts):
                dht.shutdown()


def _in(seconds: float) -> float:
    from hivemind.utils.timed_storage import get_dht_time

    return get_dht_time() + seconds
