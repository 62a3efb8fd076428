"""The caps of a peer that serves as a circuit relay (`--relay-service`), as p2pd flags. Free of hivemind
and torch, so the CLI and NodeConfig import it cheaply."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RelayLimits:
    """What a peer that serves as a relay (`--relay-service`) grants; p2pd's defaults, which it
    applies per peer. Every relayed connection is closed after `time_limit` or `data_limit` bytes each way;
    the client then dials again."""

    max_reservations: int = 128  # slots held at once
    max_circuits: int = 16  # relayed connections open at once, per peer
    data_limit: int = 4 * 2**30  # bytes each way through one relayed connection
    time_limit: float = 1800.0  # seconds one relayed connection may last

    def daemon_flags(self) -> dict[str, object]:
        """p2pd's command-line flags for these caps (hivemind's P2P.create passes none of them)."""
        for name in ("max_reservations", "max_circuits", "data_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"relay {name} must be positive, got {getattr(self, name)}")
        if self.time_limit <= 0:
            raise ValueError(f"relay time_limit must be positive, got {self.time_limit}")
        return {
            "relayService": 1,
            "relayMaxReservations": self.max_reservations,
            "relayMaxCircuits": self.max_circuits,
            "relayDataLimit": self.data_limit,
            "relayTimeLimit": f"{self.time_limit:g}s",
        }


NO_RELAY_SERVICE = {"relayService": 0}  # p2pd serves as a relay by default once it believes it is public
