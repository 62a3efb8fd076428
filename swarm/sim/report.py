"""What one policy did on one trace, minute by minute, and its summary."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PolicyRun:
    policy: str
    trace: str
    fractions: list[float] = field(default_factory=list)  # bottleneck served / optimal bound, per minute
    # the same for the announced placement, as if every node had finished loading: placement alone
    placement_fractions: list[float] = field(default_factory=list)
    reloads: int = 0  # span or stage changes of nodes already online
    joins: int = 0  # first loads of nodes arriving after the start
    node_minutes: float = 0.0  # minutes online, summed over nodes

    def record_minute(self, fraction: float, placement_fraction: float, online: int) -> None:
        self.fractions.append(fraction)
        self.placement_fractions.append(placement_fraction)
        self.node_minutes += online

    def summary(self) -> dict:
        hours = len(self.fractions) / 60.0
        ordered = sorted(self.fractions)
        return {
            "mean_fraction": round(sum(ordered) / len(ordered), 4),
            "min_fraction": round(ordered[0], 4),
            "p10_fraction": round(ordered[int(0.1 * (len(ordered) - 1))], 4),
            "mean_placement_fraction": round(sum(self.placement_fractions) / len(ordered), 4),
            "reloads_per_hour": round(self.reloads / hours, 2),
            "reloads_per_node_hour": round(self.reloads / (self.node_minutes / 60.0), 4),
            "joins_per_hour": round(self.joins / hours, 2),
        }
