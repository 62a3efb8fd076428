"""CPU time per token of every process of a local swarm while a client generates: the client, each node
(by thread) and each P2P daemon. On a machine whose cores the nodes share, a hop's latency is about the CPU
it costs, so this says where per-hop time goes. Prints one JSON object.

    python -m benchmarks.hop_cpu --nodes 3                      # a tiny random Llama (6 blocks)
    python -m benchmarks.hop_cpu --model smollm2-135m-instruct --chain client
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.common import CLIENT_THREADS, random_token_ids, torch_threads


def _cpu_by_process(root: psutil.Process) -> dict[int, tuple[str, float, dict[str, float]]]:
    """pid -> (what it is, CPU seconds, CPU seconds by thread name) for `root` and its descendants."""
    out = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            with process.oneshot():
                times = process.cpu_times()
                name = "client" if process.pid == root.pid else process.name()
                threads: dict[str, float] = {}
                for thread in process.threads():
                    try:
                        label = Path(f"/proc/{process.pid}/task/{thread.id}/comm").read_text().strip()
                    except OSError:
                        label = "?"
                    threads[label] = threads.get(label, 0.0) + thread.user_time + thread.system_time
                out[process.pid] = (name, times.user + times.system, threads)
        except psutil.Error:
            continue
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="a model name or path (default: a tiny random Llama)")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--chain", choices=["push", "client"], default="push")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    from swarm.client import DistributedModelForCausalLM
    from swarm.local import LocalSwarm, split_blocks
    from swarm.models.checkpoint import resolve_checkpoint
    from swarm.models.tiny import write_tiny_llama

    with tempfile.TemporaryDirectory(prefix="swarm-hop-cpu-") as workdir:
        model = args.model or str(write_tiny_llama(Path(workdir) / "tiny-llama", num_blocks=6))
        checkpoint = resolve_checkpoint(model)
        input_ids = random_token_ids(checkpoint, 1, 16)
        with LocalSwarm(workdir=Path(workdir) / "swarm") as swarm:
            swarm.start_bootstrap()
            swarm.start_nodes(model, split_blocks(checkpoint.num_blocks, args.nodes))
            with (
                torch_threads(CLIENT_THREADS),
                DistributedModelForCausalLM.from_pretrained(
                    model, swarm.initial_peers, push=args.chain == "push"
                ) as client,
            ):
                client.generate(input_ids, max_new_tokens=4)  # warm up routes and caches
                me = psutil.Process(os.getpid())
                before, started = _cpu_by_process(me), time.perf_counter()
                for _ in range(args.repeats):
                    with client.inference_session(max_length=16 + args.new_tokens) as session:
                        client.generate(
                            input_ids, max_new_tokens=args.new_tokens, session=session, eos_token_id=[]
                        )
                wall, after = time.perf_counter() - started, _cpu_by_process(me)
    tokens = args.new_tokens * args.repeats
    processes = []
    for pid, (name, cpu, threads) in after.items():
        if pid not in before:
            continue
        _, cpu_before, threads_before = before[pid]
        per_thread = {
            label: round(1000 * (seconds - threads_before.get(label, 0.0)) / tokens, 2)
            for label, seconds in threads.items()
            if seconds - threads_before.get(label, 0.0) > 0
        }
        processes.append({"process": name, "cpu_ms_per_token": round(1000 * (cpu - cpu_before) / tokens, 2)})
        if name != "client" and "p2pd" not in name:
            processes[-1]["by_thread"] = per_thread
    processes.sort(key=lambda p: -p["cpu_ms_per_token"])
    print(
        json.dumps(
            {
                "name": "hop_cpu",
                "model": checkpoint.name,
                "nodes": args.nodes,
                "chain": args.chain,
                "client_torch_threads": CLIENT_THREADS,
                "tokens": tokens,
                "wall_ms_per_token": round(1000 * wall / tokens, 2),
                "cpu_ms_per_token": round(sum(p["cpu_ms_per_token"] for p in processes), 2),
                "processes": [p for p in processes if p["cpu_ms_per_token"] >= 0.05],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
