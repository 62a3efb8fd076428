"""Greedy generation over emulated WAN links: every node on its own host (network namespace) with a
round trip of `--rtt-ms` to it and `--rate-mbit` of bandwidth out of it; the client is on the machine
itself. Local transformers on the same weights runs in the same process for the ratio. Needs root.

    sudo python -m benchmarks.wan --model smollm2-135m-instruct --nodes 3 --rtt-ms 50 --rate-mbit 100

`--chain push` has the nodes push each step to the next one (ClientConfig.push, the client's default),
`client` has the client take every span's output to the next; `both` measures both on the same swarm,
alternating (`--rounds` times).

Each row also gives the floor the emulated delay puts under a token (`network_floor_ms_per_token`: a round
trip per span when the client drives, (spans + 1) one-way trips when nodes push) and `ratio_ceiling`, the
ratio a chain of that kind would reach if it computed as fast as local transformers and its messages took
no time beyond the delay; `share_of_ceiling` is how much of it the swarm reaches.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from benchmarks.common import device_name, random_token_ids
from benchmarks.inference import add_client_threads_argument, local_latencies, swarm_latencies
from swarm.utils.timing import percentile


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chain", choices=["client", "push", "both"], default="push")
    parser.add_argument("--rounds", type=int, default=1, help="with --chain both: alternations of the two")
    add_client_threads_argument(parser)
    args = parser.parse_args(argv)
    chains = ["client", "push"] if args.chain == "both" else [args.chain]

    from swarm.local import split_blocks
    from swarm.models.checkpoint import resolve_checkpoint
    from swarm.testing.netns import NetnsHarness, unavailable_reason

    if reason := unavailable_reason():
        parser.error(f"the netns harness cannot run here: {reason}")
    checkpoint = resolve_checkpoint(args.model)
    input_ids = random_token_ids(checkpoint, 1, args.prompt_tokens)
    local = local_latencies(checkpoint.path, input_ids, args.new_tokens, torch.float32, "cpu", args.repeats)
    shaping = {"delay_ms": args.rtt_ms / 2, "rate_mbit": args.rate_mbit}
    with NetnsHarness() as harness:
        harness.add_host("bootstrap", **shaping)
        peers = harness.start_bootstrap("bootstrap")
        nodes = []
        for index, blocks in enumerate(split_blocks(checkpoint.num_blocks, args.nodes)):
            harness.add_host(f"host{index}", **shaping)
            nodes.append(harness.start_node(f"host{index}", args.model, blocks, peers))
        for node in nodes:
            harness.wait_ready(node)
        measured = {}
        for _ in range(args.rounds):
            for chain in chains:
                latencies_by_loop, hops, rtt = swarm_latencies(
                    args.model,
                    peers,
                    input_ids,
                    args.new_tokens,
                    torch.float32,
                    "cpu",
                    args.repeats,
                    ["swarm"],
                    push=chain == "push",
                    client_threads=args.client_threads or None,
                )
                previous = measured.get(chain, ([], hops, []))[0]
                measured[chain] = (previous + latencies_by_loop["swarm"], hops, rtt)
    for chain, (latencies, hops, rtt) in measured.items():
        print_result(args, checkpoint, chain, local, latencies, hops, rtt)


def network_floor_ms(chain: str, hops: int, rtt_ms: float) -> float:
    """The emulated delay one token's messages must cross, whatever the software: every connection to a
    node is rtt/2 each way. The client drives: a round trip per span. Push: to the first node, node to
    node, and the last node's reply."""
    return hops * rtt_ms if chain == "client" else (hops + 1) * rtt_ms / 2


def print_result(args, checkpoint, chain: str, local: list, latencies: list, hops: int, rtt: float) -> None:
    local_median, median = statistics.median(local), statistics.median(latencies)
    floor_ms = network_floor_ms(chain, hops, args.rtt_ms)
    # the best ratio a chain of this kind can reach: compute as fast as local, no time beyond the delay
    ceiling = local_median / (local_median + floor_ms / 1000)
    print(
        json.dumps(
            {
                "name": "inference_wan",
                "model": checkpoint.name,
                "device": "cpu",
                "dtype": "float32",
                "device_name": device_name("cpu"),
                "nodes": args.nodes,
                "chain": chain,
                "hops": hops,
                "emulated_rtt_ms": args.rtt_ms,
                "rate_mbit": args.rate_mbit,
                "new_tokens": args.new_tokens,
                "local_tokens_per_s": round(1 / local_median, 2),
                "swarm_tokens_per_s": round(1 / median, 2),
                "ratio": round(local_median / median, 3),
                "local_ms_per_token_median": round(1000 * local_median, 2),
                "swarm_ms_per_token_median": round(1000 * median, 2),
                "swarm_ms_per_token_p90": round(1000 * percentile(latencies, 0.9), 2),
                "rpc_info_round_trip_ms": round(1000 * rtt, 3),
                "network_ms_per_token": round(1000 * (median - local_median), 2),
                "network_floor_ms_per_token": round(floor_ms, 2),
                "ratio_ceiling": round(ceiling, 3),
                "share_of_ceiling": round(local_median / median / ceiling, 3),
                "client_torch_threads": args.client_threads or torch.get_num_threads(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
