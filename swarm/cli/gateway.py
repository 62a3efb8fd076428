"""`swarm gateway`: serve generation and the swarm map over gRPC (proto/gateway.proto)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from swarm.cli.common import (
    add_cache_dir,
    add_initial_peers,
    add_metrics,
    add_prompts,
    add_wait_for_blocks,
    check_wait_for_blocks,
)
from swarm.client.config import ClientConfig
from swarm.gateway.service import GatewayLimits

DEFAULT_PORT = 50051


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "gateway",
        help="serve generation over gRPC, for clients in any language",
        description="Join the swarm as a client and serve the swarm.gateway.Gateway gRPC service "
        "(proto/gateway.proto): streamed generation and the swarm map. Concurrent requests share one "
        "swarm client; each generation has its own inference session, closed when its stream ends or "
        "its client goes away.",
    )
    add_initial_peers(parser)
    parser.add_argument("--model", required=True, help="built-in name, HF checkpoint folder or .gguf file")
    parser.add_argument("--model-name", default=None, help="name in the DHT (default: as `swarm node`)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="port to listen on, 0 for any free one (default: %(default)s)",
    )
    parser.add_argument(
        "--default-max-new-tokens",
        type=int,
        default=GatewayLimits.default_max_new_tokens,
        help="for requests that leave max_new_tokens at 0 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=GatewayLimits.max_new_tokens,
        help="the most a request may ask for (default: %(default)s)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=GatewayLimits.max_concurrent,
        help="generations at once; more get RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    add_prompts(parser)
    parser.add_argument("--device", default="cpu", help="where the embeddings and LM head run: cpu, cuda")
    parser.add_argument(
        "--verify-rate",
        type=float,
        default=ClientConfig.verify_rate,
        help="fraction of span calls also run on a second node and compared (default: %(default)s)",
    )
    add_wait_for_blocks(parser)
    add_metrics(parser)
    parser.add_argument(
        "--map-port",
        type=int,
        default=None,
        help="serve the live swarm map as a web page at http://--host:PORT/ (0: any free port; default: off)",
    )
    add_cache_dir(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    limits = GatewayLimits(
        # a lower --max-new-tokens caps the default too
        default_max_new_tokens=min(args.default_max_new_tokens, args.max_new_tokens),
        max_new_tokens=args.max_new_tokens,
        max_concurrent=args.max_concurrent,
    )
    if not 1 <= limits.default_max_new_tokens <= limits.max_new_tokens or limits.max_concurrent < 1:
        raise ValueError("need 1 <= --default-max-new-tokens <= --max-new-tokens and --max-concurrent >= 1")
    if not 0.0 <= args.verify_rate <= 1.0:
        raise ValueError(f"--verify-rate must be within [0, 1], got {args.verify_rate}")
    check_wait_for_blocks(args)
    from swarm.client import DistributedModelForCausalLM
    from swarm.gateway.service import GatewayService
    from swarm.models import load_tokenizer
    from swarm.utils.aio import run as run_event_loop
    from swarm.utils.metrics import MetricsServer
    from swarm.web import MapPage

    try:
        tokenizer = load_tokenizer(args.model, args.cache_dir)
    except ValueError as e:
        tokenizer = None
        print(f"swarm gateway: {e}; serving input_ids only", file=sys.stderr)
    with DistributedModelForCausalLM.from_pretrained(
        args.model,
        args.initial_peers,
        model_name=args.model_name,
        cache_dir=args.cache_dir,
        device=args.device,
        prompts=args.prompts,
        verify_rate=args.verify_rate,
        wait_for_blocks=args.wait_for_blocks,
    ) as model:
        service = GatewayService(model, tokenizer, limits)
        metrics = page = None
        try:
            if args.metrics_port is not None:
                metrics = MetricsServer(service.metrics.registry, args.metrics_host, args.metrics_port)
                print(f"swarm gateway: metrics at {metrics.url}", file=sys.stderr, flush=True)
            if args.map_port is not None:
                page = MapPage(lambda: [service.swarm_map()], args.host, args.map_port)
                print(f"swarm gateway: map at {page.url}", file=sys.stderr, flush=True)
            run_event_loop(_serve_until_stopped(service, args.host, args.port))
        finally:
            for server in (metrics, page):
                if server is not None:
                    server.close()
            service.close()
    return 0


async def _serve_until_stopped(service, host: str, port: int) -> None:
    from swarm.gateway.service import serve

    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    print(f"swarm gateway: event loop {type(loop).__module__.split('.')[0]}", file=sys.stderr, flush=True)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    server, bound = await serve(service, host, port)
    print(
        f"swarm gateway: serving {service.model.swarm.model_name} on {host}:{bound}",
        file=sys.stderr,
        flush=True,
    )
    try:
        await stopped.wait()
    finally:
        await server.stop(grace=1.0)
