"""`swarm node --config node.toml`: the file's keys are the flags, flags win, `--print-config` round-trips."""

from __future__ import annotations

import tomllib

import pytest

from swarm.cli.main import main
from swarm.node.config import NodeConfig
from swarm.node.limits import NodeLimits


def effective(capsys, *argv: str) -> dict:
    assert main(["node", *argv, "--print-config"]) == 0
    return tomllib.loads(capsys.readouterr().out)


def refused(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["node", *argv, "--print-config"])
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_file_values_apply_and_flags_win(tmp_path, capsys):
    config = tmp_path / "node.toml"
    config.write_text(
        'model = "tiny-llama"\nblocks = "0:2"\nmax_batch_size = 4\nport = 31337\n'
        'initial-peers = ["/ip4/127.0.0.1/tcp/4001/p2p/QmPeer"]\ndeterministic = false\n'
    )
    values = effective(capsys, "--config", str(config), "--port", "5")
    assert values["model"] == "tiny-llama" and values["blocks"] == "0:2"
    assert values["max-batch-size"] == 4 and values["port"] == 5  # the flag wins
    assert values["initial-peers"] == ["/ip4/127.0.0.1/tcp/4001/p2p/QmPeer"]
    assert values["deterministic"] is False
    # what the file leaves out keeps the one set of defaults the Python classes use
    assert values["cache-tokens"] == NodeLimits().cache_tokens
    assert values["update-period"] == NodeConfig(model="").update_period
    # a flag of a mutually exclusive group replaces the file's choice
    values = effective(capsys, "--config", str(config), "--num-blocks", "3")
    assert values["num-blocks"] == 3 and "blocks" not in values


def test_print_config_is_a_config_file(tmp_path, capsys):
    printed = tmp_path / "printed.toml"
    first = effective(capsys, "--model", "tiny-llama", "--blocks", "1:3", "--max-sessions", "7")
    assert (
        main(["node", "--model", "tiny-llama", "--blocks", "1:3", "--max-sessions", "7", "--print-config"])
        == 0
    )
    printed.write_text(capsys.readouterr().out)
    assert effective(capsys, "--config", str(printed)) == first


@pytest.mark.parametrize(
    "content, message",
    [
        ('modle = "x"\n', "unknown key 'modle'; known keys: announce-maddrs"),
        ('max-batch-size = "4"\n', "max-batch-size: expected an integer, got '4'"),
        ('blocks = "0:2"\nnum-blocks = 3\n', "blocks and num-blocks exclude each other"),
        ('blocks = "2:1"\n', "need 0 <= START < END"),
        ('dtype = "float8"\n', "'float8' is not one of float32"),
        ("deterministic = 1\n", "expected true or false"),
        ("port = [1]\n", "expected a single value"),
        ("blocks = \n", "--config"),  # not TOML
    ],
)
def test_bad_files_are_usage_errors(tmp_path, capsys, content, message):
    config = tmp_path / "node.toml"
    config.write_text(content)
    assert message in refused(capsys, "--config", str(config))


def test_a_missing_file_and_a_missing_span_are_usage_errors(tmp_path, capsys):
    assert "No such file" in refused(capsys, "--config", str(tmp_path / "nope.toml"))
    with pytest.raises(SystemExit) as exit_:
        main(["node", "--model", "tiny-llama"])
    assert exit_.value.code == 2
    assert "one of --blocks, --train or --num-blocks is required" in capsys.readouterr().err
