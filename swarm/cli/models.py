"""`swarm models`: list and prepare built-in models."""

from __future__ import annotations

import argparse

from swarm.cli.common import add_cache_dir


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("models", help="list or fetch built-in models")
    sub = parser.add_subparsers(dest="models_command", required=True)
    sub.add_parser("list", help="show the built-in models").set_defaults(func=run_list)
    fetch = sub.add_parser("fetch", help="download and convert a built-in model ahead of time")
    fetch.add_argument("name")
    add_cache_dir(fetch)
    fetch.set_defaults(func=run_fetch)
    return parser


def run_list(args: argparse.Namespace) -> int:
    from swarm.models.catalog import BUILTIN_MODELS

    for model in BUILTIN_MODELS.values():
        print(f"{model.name}\t{model.num_blocks} blocks\t{model.license}\t{model.description}")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from swarm.models.catalog import BUILTIN_MODELS
    from swarm.models.fetch import prepare_builtin

    if args.name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {args.name!r}; see `swarm models list`")
    print(prepare_builtin(args.name, args.cache_dir))
    return 0
