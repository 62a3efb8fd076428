"""`swarm health`: print the swarm map."""

from __future__ import annotations

import argparse
import json

from swarm.cli.common import add_initial_peers


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "health",
        help="print the swarm map",
        description="Print the swarm map. Exits 0 when every announced model has all its blocks served, "
        "1 otherwise (so it can serve as a health check).",
    )
    add_initial_peers(parser)
    parser.add_argument("--model", default=None, help="only this model (default: every model announced)")
    parser.add_argument("--json", action="store_true", help="one JSON object per model")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the DHT")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from swarm.dht.factory import create_dht
    from swarm.dht.swarm_map import format_map, list_models, model_map

    dht, _ = create_dht(args.initial_peers, client_mode=True)
    try:
        models = [args.model] if args.model else list_models(dht, args.timeout)
        if not models:
            print("no models announced" if not args.json else json.dumps({"models": []}))
            return 1
        complete = True
        for model in models:
            swarm_map = model_map(dht, model, args.timeout)
            print(json.dumps(swarm_map) if args.json else format_map(swarm_map))
            complete = complete and swarm_map["num_blocks"] > 0 and not swarm_map["missing"]
        return 0 if complete else 1
    finally:
        dht.shutdown()
