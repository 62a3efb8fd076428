"""Entry points: `swarm <subcommand>` and `swarm-node` (same as `swarm node`)."""

from __future__ import annotations

import argparse
import sys

from swarm.cli import api, dht, gateway, generate, health, keys, local, models, node, run, train
from swarm.cli.common import add_swarm_key, apply_swarm_key, not_implemented, setup_logging
from swarm.cli.config_file import apply_config_file

PENDING: dict[str, tuple[str, str]] = {}  # subcommand -> (help, title of the issue that adds it)
# subcommands that start a peer, and so take --swarm-key (a private swarm's members need it)
PEER_COMMANDS = (
    "node",
    "dht",
    "generate",
    "chat",
    "local",
    "demo",
    "health",
    "gateway",
    "api",
    "run",
    "train",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm", description="Run and train LLMs on a peer-to-peer swarm.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    node.add_parser(sub)
    dht.add_parser(sub)
    models.add_parser(sub)
    generate.add_parsers(sub)
    local.add_parsers(sub)
    health.add_parser(sub)
    gateway.add_parser(sub)
    api.add_parser(sub)
    run.add_parser(sub)
    train.add_parser(sub)
    keys.add_parser(sub)
    for name in PEER_COMMANDS:
        add_swarm_key(sub.choices[name])
    for name, (help_text, issue) in PENDING.items():
        pending = sub.add_parser(name, help=help_text, add_help=True)
        pending.add_argument("rest", nargs=argparse.REMAINDER)
        pending.set_defaults(func=not_implemented(issue))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A failure is one line and a hint on stderr, exit 1 (usage errors exit 2, from
    argparse); `swarm -v ...` shows the traceback instead."""
    args = apply_config_file(build_parser(), sys.argv[1:] if argv is None else list(argv))
    setup_logging(args.verbose)
    try:
        apply_swarm_key(args)
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if args.verbose:
            raise
        print(f"swarm {args.command}: error: {failure_line(e)}", file=sys.stderr)
        print(f"hint: {failure_hint(e)}", file=sys.stderr)
        return 1


def failure_line(error: Exception) -> str:
    """An exception as one line: its type (unless it speaks for itself) and its first line of text."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    plain = isinstance(error, (FileNotFoundError, ValueError, RuntimeError)) and text
    return text if plain else f"{type(error).__name__}: {text}" if text else type(error).__name__


def failure_hint(error: Exception) -> str:
    """What to try next for a failure (the generic hint: the traceback)."""
    text = str(error)
    if "failed to connect to bootstrap peers" in text:
        return (
            "none of --initial-peers answered: is that peer running, and is each address complete "
            "(/ip4/HOST/tcp/PORT/p2p/PEER_ID, as `swarm dht` prints it)?"
        )
    return "run `swarm -v ...` with the same arguments for the full traceback"


def node_main(argv: list[str] | None = None) -> int:
    """`swarm-node ...` is `swarm node ...`."""
    return main(["node", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
