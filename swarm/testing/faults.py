"""Faults for testing defences: every attack or cheat a node or trainer can be told to commit, one registry.

Off unless named: `swarm node ... --fault byzantine:sign_flip:start=3` or `swarm train ... --fault ...`.
A fault is a set of hooks the honest code calls at fixed points; the honest path never checks names.
Listed under a "testing" heading in `--help`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI builds --help from this module: keep torch out of its import
    import torch

ATTACK_SEED = 1234  # shared by colluding attackers (e.g. random_direction's direction)


class FaultError(ValueError):
    """A --fault value that names no fault or has bad arguments."""


class Fault:
    """Hooks with honest defaults; a fault overrides the ones it corrupts."""

    name = ""

    def corrupt_gradients(self, grads: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        """The gradients this member sends to its group's averaging round at `step`."""
        return grads


@dataclass
class ByzantineGradients(Fault):
    """Sends poisoned gradients to its group's averaging rounds from step `start` on (BTARD's attacks)."""

    attack: str
    start: int = 0
    history: list[list[torch.Tensor]] = field(default_factory=list)
    name = "byzantine"

    def corrupt_gradients(self, grads: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        self.history.append([g.clone() for g in grads])
        del self.history[:-DELAY_KEPT]
        if step < self.start:
            return grads
        return ATTACKS[self.attack](grads, self)


DELAY_KEPT = 1000  # `delayed` sends the gradient from this many steps ago, or the oldest kept


def _sign_flip(grads, fault):
    return [g * -1000.0 for g in grads]


def _random_direction(grads, fault):
    import torch

    generator = torch.Generator().manual_seed(ATTACK_SEED)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))  # noqa: F821 (imported above)
    direction = [torch.randn(g.shape, generator=generator) for g in grads]
    scale = 1000.0 * norm / torch.sqrt(sum((d.double() ** 2).sum() for d in direction)).clamp_min(1e-30)
    return [(d * scale).to(g.dtype) for d, g in zip(direction, grads, strict=True)]


def _delayed(grads, fault):
    return [g.clone() for g in fault.history[0]]


def _ipm(grads, fault):
    # inner-product manipulation with the attacker's own gradient as its estimate of the honest mean
    return [g * -0.1 for g in grads]


ATTACKS: dict[str, Callable] = {
    "sign_flip": _sign_flip,
    "random_direction": _random_direction,
    "delayed": _delayed,
    "ipm": _ipm,
}


def _parse_byzantine(args: list[str]) -> Fault:
    if not args or args[0] not in ATTACKS:
        raise FaultError(f"byzantine needs an attack: one of {', '.join(ATTACKS)}")
    options = _options(args[1:], {"start"})
    return ByzantineGradients(args[0], start=int(options.get("start", 0)))


def _options(args: list[str], allowed: set[str]) -> dict[str, str]:
    options = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in allowed:
            raise FaultError(f"unknown fault option {arg!r} (expected one of {sorted(allowed)} as KEY=VALUE)")
        options[key] = value
    return options


# name -> (help, parser of the ":"-separated arguments)
FAULTS: dict[str, tuple[str, Callable[[list[str]], Fault]]] = {
    "byzantine": (
        "byzantine:ATTACK[:start=STEP] sends poisoned gradients to averaging rounds; ATTACK is one of "
        + ", ".join(ATTACKS),
        _parse_byzantine,
    ),
}


def parse_fault(text: str) -> Fault:
    """`NAME[:ARG[:ARG...]]` -> the fault; FaultError names what is wrong."""
    name, *args = text.split(":")
    if name not in FAULTS:
        raise FaultError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
    return FAULTS[name][1](args)


def add_fault_argument(parser: argparse.ArgumentParser) -> None:
    """`--fault NAME[:ARGS]` under a "testing" heading (off unless named)."""

    def fault(text: str) -> str:
        try:
            parse_fault(text)
        except FaultError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    group = parser.add_argument_group(
        "testing", "attacks and cheats for testing defences; never use in a real run"
    )
    group.add_argument(
        "--fault",
        type=fault,
        default=None,
        metavar="NAME[:ARGS]",
        help="; ".join(help_text for help_text, _ in FAULTS.values()),
    )
