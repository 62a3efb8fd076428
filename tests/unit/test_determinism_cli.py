"""`swarm node --deterministic/--no-deterministic`: one default rule, shared by the CLI and NodeConfig, and
--fault refused by the kind of node that would never commit it."""

from __future__ import annotations

import pytest

from swarm.cli.main import build_parser
from swarm.cli.node import config_from_args, run
from swarm.node.config import NodeConfig, deterministic_by_default

NODE = ["node", "--model", "m", "--blocks", "0:2"]


def parse(*extra: str):
    return build_parser().parse_args([*NODE, *extra])


def test_flag_parses_and_reaches_the_config():
    assert parse("--deterministic").deterministic is True
    assert parse("--no-deterministic").deterministic is False
    assert parse().deterministic is None  # not told: the rule decides
    assert config_from_args(parse("--deterministic")).deterministic is True
    assert config_from_args(parse("--no-deterministic")).deterministic is False
    assert config_from_args(parse()).deterministic is None
    assert "--no-deterministic" in build_parser()._subparsers._group_actions[0].choices["node"].format_help()


def test_the_default_rule_is_one_function_used_by_cli_and_config():
    assert parse().deterministic == NodeConfig(model="m").deterministic  # no CLI default of its own
    cases = {
        ("float32", "cpu"): True,
        ("bfloat16", "cpu"): False,
        ("float16", "cpu"): False,
        ("float32", "cuda"): False,
        ("float32", "cuda:1"): False,
        ("bfloat16", "cuda:0"): False,
    }
    for (dtype, device), expected in cases.items():
        assert deterministic_by_default(dtype, device) is expected, (dtype, device)
        assert NodeConfig(model="m", dtype=dtype, device=device).is_deterministic is expected
        args = parse("--dtype", dtype, "--device", device)
        assert config_from_args(args).is_deterministic is expected
        # told, the node does as told whatever the dtype and device
        assert config_from_args(
            parse("--dtype", dtype, "--device", device, "--deterministic")
        ).is_deterministic
        no = parse("--dtype", dtype, "--device", device, "--no-deterministic")
        assert not config_from_args(no).is_deterministic


def test_a_fault_is_refused_by_a_node_that_would_never_commit_it(capsys):
    assert parse("--fault", "perturb:block=1,op=q_proj").fault == ["perturb:block=1,op=q_proj"]
    with pytest.raises(SystemExit) as exit_info:
        run(parse("--fault", "byzantine:sign_flip"))
    assert exit_info.value.code == 2
    assert "applies to trainers and training nodes only, not to a serving node" in capsys.readouterr().err
    # checked before the run file is read (this one does not exist)
    args = build_parser().parse_args(["node", "--train", "missing.toml", "--fault", "perturb:block=0"])
    with pytest.raises(SystemExit) as exit_info:
        run(args)
    assert exit_info.value.code == 2
    assert "applies to serving nodes only, not to a training node" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the parser checks the fault's arguments
        parse("--fault", "perturb:block=1,ulp=0")
    assert "perturb needs ulp >= 1" in capsys.readouterr().err
