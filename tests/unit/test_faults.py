"""The --fault registry: parsing, the CLI's testing heading, and what each gradient attack sends."""

from __future__ import annotations

import pytest
import torch

from swarm.cli.main import build_parser
from swarm.testing.faults import ATTACKS, ByzantineGradients, FaultError, parse_fault


def test_faults_parse_and_bad_ones_are_refused():
    fault = parse_fault("byzantine:sign_flip:start=3")
    assert isinstance(fault, ByzantineGradients) and fault.attack == "sign_flip" and fault.start == 3
    for bad in ("nothing", "byzantine", "byzantine:teleport", "byzantine:sign_flip:begin=3"):
        with pytest.raises(FaultError):
            parse_fault(bad)


def test_fault_flag_is_under_testing_and_checked_by_the_parser(capsys):
    parser = build_parser()
    assert (
        parser.parse_args(["node", "--train", "r.toml", "--fault", "byzantine:ipm"]).fault == "byzantine:ipm"
    )
    assert parser.parse_args(["node", "--train", "r.toml"]).fault is None  # off unless named
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["train", "--run", "r", "--data", "d", "--initial-peers", "x", "--fault", "nope"])
    assert exit_info.value.code == 2
    node_parser = next(
        a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("node")
    )
    assert "testing:" in node_parser.format_help()


def test_attacks_send_what_btard_describes():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0]])]
    honest_norm = torch.sqrt(sum((g**2).sum() for g in grads))

    def sent(attack: str, step: int = 5, start: int = 0):
        return ByzantineGradients(attack, start=start).corrupt_gradients([g.clone() for g in grads], step)

    assert all(torch.equal(a, -1000 * g) for a, g in zip(sent("sign_flip"), grads, strict=True))
    assert all(torch.equal(a, -0.1 * g) for a, g in zip(sent("ipm"), grads, strict=True))
    direction = sent("random_direction")
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in direction))
    assert norm == pytest.approx(1000 * float(honest_norm), rel=1e-5)
    assert all(
        torch.equal(a, b) for a, b in zip(direction, sent("random_direction"), strict=True)
    )  # shared seed
    assert all(torch.equal(a, g) for a, g in zip(sent("sign_flip", step=1, start=3), grads, strict=True))

    delayed = ByzantineGradients("delayed")
    first = delayed.corrupt_gradients([g.clone() for g in grads], 0)
    later = delayed.corrupt_gradients([g * 7 for g in grads], 1)
    assert all(torch.equal(a, b) for a, b in zip(first, later, strict=True))  # the oldest kept gradient
    assert set(ATTACKS) == {"sign_flip", "random_direction", "delayed", "ipm"}
