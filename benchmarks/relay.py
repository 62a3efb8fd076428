"""What a relay costs per token: greedy generation through one node reached directly, then through one
behind NAT that is reached through its bootstrap peer's circuit relay, on emulated WAN links (every host
`--rtt-ms` away from the client and from each other, as in benchmarks/wan.py). Both nodes serve every
block, in the same run: first only the NAT'ed one, then a direct one that routing prefers. Needs root
and nftables.

    sudo python -m benchmarks.relay --model smollm2-135m-instruct --rtt-ms 50
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from benchmarks.common import device_name, random_token_ids
from benchmarks.inference import swarm_latencies
from swarm.utils.timing import percentile


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    from swarm.models.checkpoint import resolve_checkpoint
    from swarm.testing.netns import NetnsHarness, nat_unavailable_reason

    if reason := nat_unavailable_reason():
        parser.error(f"the netns harness cannot run here: {reason}")
    checkpoint = resolve_checkpoint(args.model)
    input_ids = random_token_ids(checkpoint, 1, args.prompt_tokens)
    blocks = f"0:{checkpoint.num_blocks}"
    shaping = {"delay_ms": args.rtt_ms / 2}
    result = {}
    with NetnsHarness() as harness:
        harness.add_host("relay", **shaping)  # the NAT'ed node's link to its relay crosses this delay too
        harness.add_host("office", **shaping)
        harness.add_nat_host("home")
        peers = harness.start_bootstrap("relay")
        nat = harness.start_node("home", args.model, blocks, peers, "--throughput", "10")
        harness.wait_ready(nat)
        for name in ("relayed", "direct"):
            if name == "direct":  # announced 100x faster: every route now goes to it
                direct = harness.start_node("office", args.model, blocks, peers, "--throughput", "1000")
                harness.wait_ready(direct)
            latencies_by_loop, hops, rtt = swarm_latencies(
                args.model, peers, input_ids, args.new_tokens, torch.float32, "cpu", args.repeats, ["swarm"]
            )
            latencies = latencies_by_loop["swarm"]
            result[name] = {
                "ms_per_token_median": round(1000 * statistics.median(latencies), 2),
                "ms_per_token_p90": round(1000 * percentile(latencies, 0.9), 2),
                "rpc_info_round_trip_ms": round(1000 * rtt, 3),
                "hops": hops,
            }
    relayed, direct = result["relayed"], result["direct"]
    extra_ms = relayed["ms_per_token_median"] - direct["ms_per_token_median"]
    print(
        json.dumps(
            {
                "name": "relay_cost",
                "model": checkpoint.name,
                "device_name": device_name("cpu"),
                "emulated_rtt_ms": args.rtt_ms,
                "new_tokens": args.new_tokens,
                "direct": direct,
                "relayed": relayed,
                "relay_ms_per_token": round(extra_ms, 2),
                "ratio": round(direct["ms_per_token_median"] / relayed["ms_per_token_median"], 3),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
