"""Churn traces: when each node is online. A trace depends only on its seed, never on the policy run on it,
so every policy meets exactly the same arrivals and failures.

- `exponential_trace`: `nodes` nodes at time 0, then Poisson arrivals at `nodes / mean lifetime` per minute,
  every node staying an exponential lifetime (mean 60 min), which keeps about `nodes` online.
- `correlated_trace`: the same nodes, and every `outage_every` minutes one region (nodes are spread over four
  regions holding 30/25/25/20% of them) drops out at once for `outage_minutes`; its nodes whose own lifetime
  has not run out come back when the outage ends, and the region's arrivals during it wait for its end.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from swarm.sim.population import Hardware, sample_hardware

MEAN_LIFETIME_MINUTES = 60.0
REGION_SHARES = (0.30, 0.25, 0.25, 0.20)


@dataclass(frozen=True)
class Session:
    """One stay of one node: online over [arrive, leave) minutes; a node back after an outage is a new
    session with the same `machine`."""

    session_id: int
    machine: int
    hardware: Hardware
    region: int
    arrive: float
    leave: float

    @property
    def lifetime(self) -> float:
        return self.leave - self.arrive


@dataclass(frozen=True)
class Trace:
    name: str
    minutes: int
    sessions: list[Session]  # sorted by arrival, then id
    outages: list[tuple[float, float, int]]  # (start, end, region)


def exponential_trace(
    nodes: int, minutes: int, seed: int, mean_lifetime: float = MEAN_LIFETIME_MINUTES
) -> Trace:
    rng = random.Random(seed)
    sessions = []

    def add(arrive: float) -> None:
        machine = len(sessions)
        region = rng.choices(range(len(REGION_SHARES)), weights=REGION_SHARES)[0]
        leave = arrive + rng.expovariate(1.0 / mean_lifetime)
        sessions.append(Session(machine, machine, sample_hardware(rng), region, arrive, leave))

    for _ in range(nodes):
        add(0.0)
    arrival_rate = nodes / mean_lifetime  # per minute: arrivals balance departures at `nodes` online
    now = rng.expovariate(arrival_rate)
    while now < minutes:
        add(now)
        now += rng.expovariate(arrival_rate)
    return Trace("exponential", minutes, sessions, [])


def correlated_trace(
    nodes: int,
    minutes: int,
    seed: int,
    outage_every: float = 180.0,
    outage_minutes: float = 30.0,
    first_outage: float = 90.0,
    mean_lifetime: float = MEAN_LIFETIME_MINUTES,
) -> Trace:
    base = exponential_trace(nodes, minutes, seed, mean_lifetime)
    outages = []
    start, index = first_outage, 0
    while start < minutes:
        outages.append((start, start + outage_minutes, index % len(REGION_SHARES)))
        start, index = start + outage_every, index + 1

    sessions = list(base.sessions)
    for start, end, region in outages:
        affected = []
        for session in sessions:
            if session.region != region or session.leave <= start or session.arrive >= end:
                affected.append(session)
            elif (
                session.arrive < start
            ):  # online when the region fails: cut off, back at the end if still due
                affected.append(replace(session, leave=start))
                if session.leave > end:
                    affected.append(replace(session, arrive=end))
            elif session.leave > end:  # would have arrived during the outage: waits for its end
                affected.append(replace(session, arrive=end))
        sessions = affected
    sessions.sort(key=lambda s: (s.arrive, s.machine))
    sessions = [replace(s, session_id=i) for i, s in enumerate(sessions)]
    return Trace("correlated", minutes, sessions, outages)
