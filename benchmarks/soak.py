"""Churn soak: 6 nodes (every span served twice), 2 clients generating greedily in a loop, and every
`--kill-every` seconds one node SIGKILLed (process group: its DHT and libp2p daemon too) and a new one
started on its span. Every generation must finish and equal local greedy decoding on the same weights.

    python -m benchmarks.soak --duration 300            # `make soak`: 5 minutes on a tiny random model
    python -m benchmarks.soak --model smollm2-135m-instruct --duration 300

A node is only killed while the other node of its span is ready, so that the swarm always covers every
block: what is measured is recovery from churn, not an outage. Prints one JSON line; exits 1 if any
generation failed or differed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import run_until_sigterm

SPANS = 3  # each served twice: 6 nodes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="a model name or path (default: a tiny random Llama)")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of churn")
    parser.add_argument("--kill-every", type=float, default=10.0, help="seconds between kills")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.kill_every <= 0 or args.clients < 1 or args.new_tokens < 1:
        parser.error("--duration, --kill-every, --clients and --new-tokens must be positive")
    run_until_sigterm(soak, args)


def soak(args) -> None:
    from transformers import AutoModelForCausalLM

    from swarm.client import DistributedModelForCausalLM
    from swarm.local import LocalSwarm, split_blocks
    from swarm.models.checkpoint import resolve_checkpoint
    from swarm.models.tiny import write_tiny_llama

    with tempfile.TemporaryDirectory(prefix="swarm-soak-") as workdir:
        model = args.model or str(write_tiny_llama(Path(workdir) / "tiny-llama-soak", num_blocks=6))
        checkpoint = resolve_checkpoint(model)
        local = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32).eval()
        spans = split_blocks(checkpoint.num_blocks, SPANS)
        rng = random.Random(args.seed)
        stats = {"generations": 0, "failed": 0, "differed": 0, "kills": 0, "joins": 0, "recoveries": 0}
        errors: list[str] = []
        lock = threading.Lock()
        with LocalSwarm(workdir=Path(workdir) / "swarm") as swarm:
            swarm.start_bootstrap()
            nodes = swarm.start_nodes(
                model, [span for span in spans for _ in range(2)], "--update-period", "2"
            )
            serving = {span: nodes[2 * i : 2 * i + 2] for i, span in enumerate(spans)}
            stop = threading.Event()

            def client(index: int) -> None:
                generator = torch.Generator().manual_seed(args.seed * 100 + index)
                vocab = local.config.vocab_size
                with DistributedModelForCausalLM.from_pretrained(model, swarm.initial_peers) as remote:
                    while not stop.is_set():
                        prompt = torch.randint(3, vocab, (1, args.prompt_tokens), generator=generator)
                        with torch.no_grad():
                            expected = local.generate(
                                prompt, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=[]
                            )
                        try:
                            length = args.prompt_tokens + args.new_tokens
                            with remote.inference_session(max_length=length) as session:
                                got = remote.generate(
                                    prompt, max_new_tokens=args.new_tokens, session=session, eos_token_id=[]
                                )
                                recoveries = session.num_recoveries
                        except Exception as e:
                            with lock:
                                stats["failed"] += 1
                                errors.append(f"client {index}: {e!r}")
                            continue
                        with lock:
                            stats["generations"] += 1
                            stats["recoveries"] += recoveries
                            if not torch.equal(got, expected):
                                stats["differed"] += 1
                                errors.append(f"client {index}: {got.tolist()} != {expected.tolist()}")

            threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
            for thread in threads:
                thread.start()
            started = time.monotonic()
            joining: list[tuple[str, object]] = []  # (span, process) started and not ready yet
            try:
                while time.monotonic() - started < args.duration:
                    time.sleep(args.kill_every)
                    for span, process in list(joining):  # replacements that are ready now serve their span
                        if _ready(swarm, process):
                            serving[span].append(process)
                            joining.remove((span, process))
                            stats["joins"] += 1
                    # a span whose two nodes are both up: kill one, start its replacement
                    whole = [
                        s for s, nodes in serving.items() if len(nodes) == 2 and all(n.alive() for n in nodes)
                    ]
                    if not whole:
                        continue
                    span = rng.choice(whole)
                    victim = rng.choice(serving[span])
                    victim.kill()
                    stats["kills"] += 1
                    serving[span].remove(victim)
                    joining.append((span, swarm.start_node(model, span, "--update-period", "2", wait=False)))
                for _, process in joining:  # the last ones get their time to join
                    swarm.wait_ready(process)
                    stats["joins"] += 1
            finally:
                stop.set()
                for thread in threads:
                    thread.join(timeout=120)
    row = {
        "name": "soak",
        "model": checkpoint.name,
        "device": "cpu",
        "nodes": 2 * SPANS,
        "clients": args.clients,
        "duration_s": args.duration,
        "kill_every_s": args.kill_every,
        **stats,
        "errors": errors[:5],
    }
    print(json.dumps(row), flush=True)
    if stats["failed"] or stats["differed"] or not stats["generations"]:
        sys.exit(1)


def _ready(swarm, process) -> bool:
    try:
        swarm.wait_ready(process, timeout=0.1)
        return True
    except TimeoutError:
        return False


if __name__ == "__main__":
    main()
