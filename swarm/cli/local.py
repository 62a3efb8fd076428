"""`swarm local` (a swarm on this machine until Ctrl-C) and `swarm demo` (one question through one)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time

from swarm.cli.common import add_cache_dir
from swarm.node.config import DTYPE_NAMES
from swarm.utils.timing import TokenTimer

logger = logging.getLogger(__name__)

DEMO_MODEL = "smollm2-135m-instruct"
DEMO_QUESTION = "What is the capital of France?"


def add_parsers(subparsers) -> None:
    local = subparsers.add_parser("local", help="start a bootstrap peer and N nodes on this machine")
    local.add_argument("--model", default=DEMO_MODEL, help="built-in name, HF folder or .gguf file")
    local.add_argument("--nodes", type=int, default=3, help="nodes that split the model's blocks")
    add_node_options(local)
    local.set_defaults(func=run_local)

    demo = subparsers.add_parser("demo", help="start a local swarm and answer one question through it")
    demo.add_argument("--model", default=DEMO_MODEL)
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument("--question", default=DEMO_QUESTION)
    demo.add_argument("--max-new-tokens", type=int, default=48)
    add_node_options(demo)
    demo.set_defaults(func=run_demo)


def add_node_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=None, help="where node logs go (default: a temporary folder)")
    add_cache_dir(parser)


def start_local_swarm(args: argparse.Namespace):
    """Prepare the model once, then start a bootstrap peer and nodes that split its blocks."""
    from swarm.local import LocalSwarm, split_blocks
    from swarm.models.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.model, args.cache_dir)  # fetches/converts once, before the nodes
    spans = split_blocks(checkpoint.num_blocks, args.nodes)
    env = {"SWARM_CACHE": args.cache_dir} if args.cache_dir else None
    swarm = LocalSwarm(workdir=args.workdir, env=env)
    try:
        swarm.start_bootstrap()
        extra = ["--dtype", args.dtype, "--device", args.device]
        logger.info("starting %d nodes serving %s as %s", args.nodes, checkpoint.name, ", ".join(spans))
        swarm.start_nodes(args.model, spans, *extra)
    except BaseException:
        swarm.close()
        raise
    return swarm, checkpoint


def run_local(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    swarm, checkpoint = start_local_swarm(args)
    try:
        print(f"model: {checkpoint.name}")
        print("initial peers: " + " ".join(swarm.initial_peers), flush=True)
        logger.info("local swarm is up (logs in %s); Ctrl-C stops it", swarm.workdir)
        while not stop.wait(1.0):
            dead = [p.name for p in swarm.processes if not p.alive()]
            if dead:
                logger.error("%s exited; stopping the local swarm", ", ".join(dead))
                return 1
        return 0
    finally:
        swarm.close()


def run_demo(args: argparse.Namespace) -> int:
    from swarm.cli.generate import encode_prompt
    from swarm.client import DistributedModelForCausalLM
    from swarm.models import load_tokenizer

    started = time.perf_counter()
    swarm, checkpoint = start_local_swarm(args)
    try:
        tokenizer = load_tokenizer(args.model, args.cache_dir)
        with DistributedModelForCausalLM.from_pretrained(args.model, swarm.initial_peers) as model:
            ready = time.perf_counter()
            input_ids = encode_prompt(tokenizer, args.question, chat=True)
            timer = TokenTimer()
            with model.inference_session(max_length=input_ids.shape[1] + args.max_new_tokens) as session:
                output = model.generate(
                    input_ids, max_new_tokens=args.max_new_tokens, session=session, streamer=timer
                )
                route = session.route
        answer = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()
        print(f"Q: {args.question}")
        print(f"A: {answer}")
        print("route:")
        for span in route:
            print(f"  blocks [{span.start:2d}, {span.end:2d})  node {span.peer_id}")
        print(timer.summary())
        print(f"swarm of {args.nodes} nodes up in {ready - started:.1f} s")
        return 0
    finally:
        swarm.close()
