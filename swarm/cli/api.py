"""`swarm api`: an OpenAI-compatible HTTP API over the swarm (chat completions, completions, models)."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from swarm.api.engine import APILimits
from swarm.cli.common import (
    add_cache_dir,
    add_initial_peers,
    add_prompts,
    add_wait_for_blocks,
    check_wait_for_blocks,
)

DEFAULT_PORT = 8000


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "api",
        help="serve an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models)",
        description="Join the swarm as a client and serve OpenAI's HTTP API for one or more models, so that "
        "any tool that speaks it can use the swarm by changing its base URL. Concurrent requests share "
        "one swarm client per model; each completion has its own inference session, closed when it ends "
        "or its client goes away.",
    )
    add_initial_peers(parser)
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help="built-in name, HF checkpoint folder or .gguf file (repeat for more models)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port, 0 for any free one (default: %(default)s)"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SWARM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every request (default: $SWARM_API_KEY, else none)",
    )
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=APILimits.default_max_tokens,
        help="for requests that name no max_tokens (default: %(default)s)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=APILimits.max_tokens,
        help="the most a request may ask for (default: %(default)s)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=APILimits.max_concurrent,
        help="completions at once; more get 429 (default: %(default)s)",
    )
    add_prompts(parser)
    add_wait_for_blocks(parser)
    parser.add_argument("--device", default="cpu", help="where the embeddings and LM head run: cpu, cuda")
    add_cache_dir(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    limits = APILimits(
        default_max_tokens=min(args.default_max_tokens, args.max_tokens),
        max_tokens=args.max_tokens,
        max_concurrent=args.max_concurrent,
    )
    if not 1 <= limits.default_max_tokens <= limits.max_tokens or limits.max_concurrent < 1:
        raise ValueError("need 1 <= --default-max-tokens <= --max-tokens and --max-concurrent >= 1")
    check_wait_for_blocks(args)
    import uvicorn

    from swarm.api.app import APIServer
    from swarm.api.engine import ServedModel
    from swarm.client import DistributedModelForCausalLM
    from swarm.models import load_tokenizer

    tokenizers = [load_tokenizer(model, args.cache_dir) for model in args.model]  # fails before joining
    served: list[ServedModel] = []
    try:
        for model, tokenizer in zip(args.model, tokenizers, strict=True):
            client = DistributedModelForCausalLM.from_pretrained(
                model,
                args.initial_peers,
                cache_dir=args.cache_dir,
                device=args.device,
                prompts=args.prompts,
                wait_for_blocks=args.wait_for_blocks,
            )
            served.append(ServedModel(client.swarm.model_name, client, tokenizer))
        server = APIServer(served, limits, api_key=args.api_key)
        sock = _listening_socket(args.host, args.port)
        loop = "uvloop" if _has_uvloop() else "asyncio"
        config = uvicorn.Config(
            server.app, loop=loop, log_level="warning", lifespan="off", timeout_graceful_shutdown=2
        )
        host, port = sock.getsockname()[:2]
        names = ", ".join(s.name for s in served)
        print(f"swarm api: serving {names} at http://{host}:{port}/v1 ({loop})", file=sys.stderr, flush=True)
        try:
            uvicorn.Server(config).run(sockets=[sock])  # until SIGINT or SIGTERM
        finally:
            server.close()
            sock.close()
    finally:
        for s in served:
            s.model.close()
    return 0


def _listening_socket(host: str, port: int) -> socket.socket:
    """Bound and listening before the address is printed, so that a client may connect at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"can't listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True
