"""Entry points: `swarm <subcommand>` and `swarm-node` (same as `swarm node`)."""

from __future__ import annotations

import argparse
import sys

from swarm.cli import dht, generate, health, local, models, node, run, train
from swarm.cli.common import not_implemented, setup_logging

PENDING: dict[str, tuple[str, str]] = {}  # subcommand -> (help, title of the issue that adds it)


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
    run.add_parser(sub)
    train.add_parser(sub)
    for name, (help_text, issue) in PENDING.items():
        pending = sub.add_parser(name, help=help_text, add_help=True)
        pending.add_argument("rest", nargs=argparse.REMAINDER)
        pending.set_defaults(func=not_implemented(issue))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return args.func(args) or 0


def node_main(argv: list[str] | None = None) -> int:
    """`swarm-node ...` is `swarm node ...`."""
    return main(["node", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
