"""`swarm health`: print the swarm map."""

from __future__ import annotations

import argparse
import json
import os
import sys

from swarm.cli.common import add_cache_dir, add_initial_peers


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "health",
        help="print the swarm map",
        description="Print the swarm map. Exits 0 when every announced model has all its blocks served, "
        "1 otherwise (so it can serve as a health check).",
    )
    add_initial_peers(parser)
    parser.add_argument(
        "--model",
        default=None,
        help="only this model (default: every model announced): its DHT name, or the --model value its nodes "
        "were started with (a checkpoint folder or .gguf file stands for the name they announce, and for "
        "the weights to re-check verdicts with)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per model")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the DHT")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="weights to re-check verdicts with (built-in name or checkpoint folder; default: the built-in "
        "model of that name if it is in the local cache); verdicts not re-checked are only counted",
    )
    parser.add_argument(
        "--serve",
        type=int,
        default=None,
        metavar="PORT",
        help="instead of printing, serve the live map as a web page on PORT (0: any free port) until Ctrl-C",
    )
    parser.add_argument("--host", default="127.0.0.1", help="with --serve: the address to listen on")
    add_cache_dir(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from swarm.dht.factory import create_dht
    from swarm.dht.swarm_map import format_map, list_models, model_map
    from swarm.models.checkpoint import default_model_name

    checkpoint = args.checkpoint
    if args.model is not None and default_model_name(args.model) != args.model:  # a folder or .gguf file
        checkpoint = checkpoint or args.model
        args.model = default_model_name(args.model)
    dht, _ = create_dht(args.initial_peers, client_mode=True)
    if args.serve is not None:
        try:
            return _serve(args, dht, checkpoint)
        finally:
            dht.shutdown()
    try:
        models = [args.model] if args.model else list_models(dht, args.timeout)
        if not models:
            print("no models announced" if not args.json else json.dumps({"models": []}))
            from swarm.access.keys import SWARM_KEY_ENV

            if not os.environ.get(SWARM_KEY_ENV):
                print(
                    "swarm health: a private swarm's records are read only with its --swarm-key",
                    file=sys.stderr,
                )
            return 1
        complete = True
        for model in models:
            swarm_map = model_map(dht, model, args.timeout, _block_loader(checkpoint, model, args.cache_dir))
            print(json.dumps(swarm_map) if args.json else format_map(swarm_map))
            complete = complete and swarm_map["num_blocks"] > 0 and not swarm_map["missing"]
        return 0 if complete else 1
    finally:
        dht.shutdown()


def _serve(args: argparse.Namespace, dht, checkpoint: str | None) -> int:
    """Serve the live map page until SIGTERM or Ctrl-C."""
    import signal
    import threading

    from swarm.dht.swarm_map import list_models, model_map
    from swarm.web import MapPage

    loaders: dict = {}

    def read_maps() -> list[dict]:
        models = [args.model] if args.model else list_models(dht, args.timeout)
        for model in models:
            if model not in loaders:
                loaders[model] = _block_loader(checkpoint, model, args.cache_dir)
        return [model_map(dht, model, args.timeout, loaders[model]) for model in models]

    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    page = MapPage(read_maps, args.host, args.serve)
    print(f"swarm health: map at {page.url}", file=sys.stderr, flush=True)
    try:
        stopped.wait()
    finally:
        page.close()
    return 0


def _block_loader(checkpoint: str | None, model: str, cache_dir):
    """One block of weights to re-check a verdict with: `--checkpoint`'s, else the built-in model's when it
    is already in the local cache (health downloads nothing by itself); None when there are none."""
    from swarm.models.catalog import get_builtin
    from swarm.models.checkpoint import resolve_checkpoint
    from swarm.models.fetch import default_cache_dir, is_complete
    from swarm.models.span import load_span

    if checkpoint is None:
        if get_builtin(model) is None or not is_complete(default_cache_dir(cache_dir) / "models" / model):
            return lambda block: None
        checkpoint = model
    try:
        resolved = resolve_checkpoint(checkpoint, cache_dir, model_name=model)
    except Exception as e:
        print(f"swarm health: can't re-check verdicts with {checkpoint}: {e}", file=sys.stderr)
        return lambda block: None
    return lambda block: load_span(resolved, block, block + 1) if resolved.block_tensor_names(block) else None
