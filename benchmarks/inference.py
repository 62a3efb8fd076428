"""Greedy generation through a local swarm of 1..N nodes against local transformers, in one run.

Prints one JSON object per line. Per-token latency is the time between consecutive new tokens (the
prefill is reported apart); per-hop overhead compares swarms with different node counts on the same
weights, so compute is equal and the difference is hops. `--decoding-loop both` times the swarm's own
decoding loop and transformers' generate() over the same swarm, alternating runs (same tokens, greedy).

    python -m benchmarks.inference --model smollm2-135m-instruct --nodes 1 2 3 --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.common import (
    CLIENT_THREADS,
    device_name,
    random_token_ids,
    release_memory,
    start_split_swarm,
    torch_threads,
)
from swarm.utils.timing import TokenTimer, percentile


def local_latencies(checkpoint_path, input_ids, new_tokens: int, dtype, device, repeats: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint_path, dtype=dtype).to(device).eval()
    runs = []
    for _ in range(repeats + 1):  # the first run warms up
        timer = TokenTimer()
        with torch.no_grad():
            model.generate(
                input_ids.to(device),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=timer,
            )
        runs.append(timer.gaps())
    del model
    release_memory(device)
    return [t for run in runs[1:] for t in run]


def swarm_latencies(
    model_name,
    peers,
    input_ids,
    new_tokens: int,
    dtype,
    device,
    repeats: int,
    loops,
    push: bool = True,
    client_threads: int | None = CLIENT_THREADS,
):
    """Per-token gaps for each decoding loop in `loops` (runs alternate), the route's hops, the RPC RTT.
    `push`: steps go node to node (ClientConfig.push, the default); off, through the client at every hop.
    `client_threads`: the client's torch threads while it runs (None: torch's own; see CLIENT_THREADS)."""
    from swarm.client import DistributedModelForCausalLM

    with (
        torch_threads(client_threads),
        DistributedModelForCausalLM.from_pretrained(
            model_name, peers, dtype=dtype, device=device, push=push
        ) as model,
    ):
        runs, hops = {loop: [] for loop in loops}, 0
        for _ in range(repeats + 1):
            for loop in loops:
                timer = TokenTimer()
                with model.inference_session(max_length=input_ids.shape[1] + new_tokens) as session:
                    model.generate(
                        input_ids,
                        max_new_tokens=new_tokens,
                        session=session,
                        streamer=timer,
                        eos_token_id=[],
                        decoding_loop=loop,
                    )
                    hops = len(session.route)
                runs[loop].append(timer.gaps())
        rtts = []
        route = model.find_route()
        from swarm.client.remote import get_info

        for _ in range(50):
            started = time.perf_counter()
            model.run_async(get_info(model.p2p, route[0].peer_id, 10))
            rtts.append(time.perf_counter() - started)
    latencies = {loop: [t for run in loop_runs[1:] for t in run] for loop, loop_runs in runs.items()}
    return latencies, hops, statistics.median(rtts)


def add_client_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--client-threads",
        type=int,
        default=CLIENT_THREADS,
        help="torch threads of the swarm client while it generates (0: torch's own; the local baseline "
        f"always runs with torch's own). Default {CLIENT_THREADS}: see benchmarks.common.CLIENT_THREADS",
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--decoding-loop", choices=["swarm", "transformers", "both"], default="swarm")
    parser.add_argument(
        "--chain",
        choices=["push", "client"],
        default="push",
        help="nodes push steps on, or the client drives",
    )
    add_client_threads_argument(parser)
    args = parser.parse_args(argv)
    loops = ["swarm", "transformers"] if args.decoding_loop == "both" else [args.decoding_loop]

    from swarm.local import LocalSwarm
    from swarm.models.checkpoint import resolve_checkpoint
    from swarm.utils.tensors import FLOAT_DTYPES

    dtype = FLOAT_DTYPES[args.dtype]
    checkpoint = resolve_checkpoint(args.model)
    input_ids = random_token_ids(checkpoint, 1, args.prompt_tokens)
    local = local_latencies(checkpoint.path, input_ids, args.new_tokens, dtype, args.device, args.repeats)
    local_median = statistics.median(local)
    rows = []
    for nodes in args.nodes:
        with LocalSwarm() as swarm:
            start_split_swarm(swarm, args.model, checkpoint.num_blocks, nodes, args.device, args.dtype)
            latencies_by_loop, hops, rtt = swarm_latencies(
                args.model,
                swarm.initial_peers,
                input_ids,
                args.new_tokens,
                dtype,
                args.device,
                args.repeats,
                loops,
                push=args.chain == "push",
                client_threads=args.client_threads or None,
            )
        for loop, latencies in latencies_by_loop.items():
            median = statistics.median(latencies)
            row = {
                "name": "inference",
                "model": checkpoint.name,
                "device": args.device,
                "dtype": args.dtype,
                "device_name": device_name(args.device),
                "nodes": nodes,
                "hops": hops,
                "decoding_loop": loop,
                "chain": args.chain,
                "new_tokens": args.new_tokens,
                "local_tokens_per_s": round(1 / local_median, 2),
                "swarm_tokens_per_s": round(1 / median, 2),
                "ratio": round(local_median / median, 3),
                "local_ms_per_token_median": round(1000 * local_median, 2),
                "local_ms_per_token_p90": round(1000 * percentile(local, 0.9), 2),
                "swarm_ms_per_token_median": round(1000 * median, 2),
                "swarm_ms_per_token_p90": round(1000 * percentile(latencies, 0.9), 2),
                "rpc_info_round_trip_ms": round(1000 * rtt, 3),
                "client_torch_threads": args.client_threads or torch.get_num_threads(),
            }
            if loop == loops[0]:
                rows.append(row)
            print(json.dumps(row), flush=True)
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        extra_hops = last["hops"] - first["hops"]
        if extra_hops > 0:
            overhead = (last["swarm_ms_per_token_median"] - first["swarm_ms_per_token_median"]) / extra_hops
            print(
                json.dumps(
                    {
                        "name": "per_hop_overhead",
                        "model": checkpoint.name,
                        "device": args.device,
                        "dtype": args.dtype,
                        "nodes": [first["nodes"], last["nodes"]],
                        "per_hop_overhead_ms": round(overhead, 3),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
