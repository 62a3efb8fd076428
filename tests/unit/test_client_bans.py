"""The client's ban list: back-off, cool-downs, forgiveness and a bounded size."""

from __future__ import annotations

from swarm.client.bans import BanList


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bans_double_and_cool_downs_do_not_count():
    clock = Clock()
    bans = BanList(base=10, cap=40, clock=clock)
    assert [bans.ban("a") for _ in range(4)] == [10, 20, 40, 40]
    bans.cool_down("b", 5)
    assert "b" in bans and bans.failures("b") == 0
    clock.now = 6
    assert "b" not in bans and "a" in bans
    assert bans.ban("b") == 10  # a cool-down is not a failure: its first ban is the shortest


def test_old_bans_are_forgiven_and_the_list_stays_bounded():
    clock = Clock()
    bans = BanList(base=10, cap=40, clock=clock, forgive_after=100, max_entries=50)
    bans.ban("a")
    bans.ban("a")
    clock.now = 20 + 101  # the second ban lasted until t=20: it ended more than forgive_after ago
    assert bans.failures("a") == 2
    bans.ban("other")  # any change prunes
    assert bans.failures("a") == 0 and bans.ban("a") == 10
    for i in range(500):
        clock.now += 0.01
        bans.ban(f"peer{i}")
    assert len(bans) <= 50
    assert f"peer{499}" in bans and "peer0" not in bans  # the oldest are forgotten first
