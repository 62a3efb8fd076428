"""The command line: every subcommand is listed, unfinished ones say so, and defaults match the classes."""

import subprocess

from swarm.cli.main import PENDING, build_parser
from swarm.cli.node import config_from_args
from swarm.client.config import ClientConfig
from swarm.local import run_cli
from swarm.node.config import NodeConfig
from swarm.node.limits import NodeLimits

SUBCOMMANDS = ["node", "dht", "generate", "chat", "local", "demo", "health", "models", "run", "train"]


def swarm_cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(list(args), timeout=120)


def test_help_lists_every_subcommand_and_pending_ones_fail_loudly():
    result = swarm_cli("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert f"    {name}" in result.stdout, name
    for name in PENDING:
        pending = swarm_cli(name)
        assert pending.returncode != 0
        assert "not implemented yet (issue: " in pending.stderr


def test_models_list_shows_the_builtin_model():
    result = swarm_cli("models", "list")
    assert result.returncode == 0
    assert "smollm2-135m-instruct" in result.stdout


def test_node_cli_defaults_are_the_class_defaults():
    args = build_parser().parse_args(["node", "--model", "m", "--blocks", "0:1"])
    config, limits = NodeConfig(model="m"), NodeLimits()
    for name in (
        "device",
        "dtype",
        "host",
        "port",
        "update_period",
        "throughput",
        "balance_period",
        "balance_quality",
        "num_blocks",
        "announce_maddrs",
        "deterministic",
        "num_threads",
    ):
        assert getattr(args, name) == getattr(config, name), name
    assert args.max_batch_size == limits.max_batch_size
    assert args.max_sequence_length == limits.max_sequence_length
    assert args.request_timeout == limits.request_timeout
    assert args.cache_tokens == limits.cache_tokens
    assert args.session_timeout == limits.session_timeout
    assert args.max_request_mb * 2**20 == limits.max_request_bytes
    assert args.max_buffered_mb * 2**20 == limits.max_buffered_bytes
    for name in (
        "max_sessions",
        "max_sessions_per_peer",
        "max_streams",
        "max_streams_per_peer",
        "stream_message_timeout",
    ):
        assert getattr(args, name) == getattr(limits, name), name
    assert config_from_args(args).limits == limits


def test_announce_maddrs_reach_the_node_config_and_the_bootstrap_peer():
    from swarm.cli.node import config_from_args

    maddr = "/ip4/203.0.113.7/tcp/31337"
    args = build_parser().parse_args(["node", "--model", "m", "--blocks", "0:1", "--announce-maddrs", maddr])
    assert config_from_args(args).announce_maddrs == [maddr]
    assert build_parser().parse_args(["dht", "--announce-maddrs", maddr]).announce_maddrs == [maddr]


def test_swarm_node_script_is_swarm_node():
    from swarm.cli.main import node_main

    try:
        node_main(["--blocks", "0:1"])
    except SystemExit as e:
        assert e.code == 2  # argparse: --model is required, as for `swarm node`
    else:
        raise AssertionError("swarm-node without --model must fail")


def test_generate_and_chat_take_a_verify_rate_within_zero_one():
    parser = build_parser()
    for command in ("generate", "chat"):
        extra = ["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x"] + (
            ["--prompt", "hi"] if command == "generate" else []
        )
        args = parser.parse_args([command, "--model", "m", *extra])
        assert args.verify_rate == ClientConfig().verify_rate == 0.0
        assert parser.parse_args([command, "--model", "m", "--verify-rate", "0.1", *extra]).verify_rate == 0.1
    peers = ["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x"]
    refused = swarm_cli("generate", "--model", "m", "--prompt", "hi", *peers, "--verify-rate", "1.5")
    assert refused.returncode == 2 and "must be within [0, 1]" in refused.stderr
