"""Where one generated token's time goes in a swarm: client head, serialization, each hop's round trip,
and the node's own compute for its span (measured on the same span locally). Prints one JSON object.

    python -m benchmarks.profile_tokens --model smollm2-135m-instruct --nodes 3 --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch

from benchmarks.common import random_token_ids
from swarm.utils.timing import TokenTimer


def median_ms(values) -> float:
    return round(1000 * statistics.median(values), 3) if values else 0.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    from swarm.client import DistributedModelForCausalLM
    from swarm.local import LocalSwarm, split_blocks
    from swarm.models.checkpoint import resolve_checkpoint
    from swarm.models.span import load_span
    from swarm.node.kv_cache import SpanCache
    from swarm.utils.tensors import serialize

    checkpoint = resolve_checkpoint(args.model)
    spans = split_blocks(checkpoint.num_blocks, args.nodes)
    hidden_size = checkpoint.config.hidden_size
    hop_times: dict[str, list[float]] = defaultdict(list)

    def on_hop(span, new_tokens: int, seconds: float) -> None:
        if new_tokens == 1:  # decode steps only, not the prefill
            hop_times[f"{span.start}:{span.end}"].append(seconds)

    input_ids = random_token_ids(checkpoint, 1, 16)
    timer = TokenTimer()
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.start_nodes(args.model, spans)
        with DistributedModelForCausalLM.from_pretrained(args.model, swarm.initial_peers) as model:
            with model.inference_session(max_length=16 + args.new_tokens) as session:
                session.on_hop = on_hop
                model.generate(
                    input_ids,
                    max_new_tokens=args.new_tokens,
                    session=session,
                    streamer=timer,
                    eos_token_id=[],
                )
            head_times, embed_times = [], []
            last = torch.randn(1, 1, hidden_size)
            for _ in range(20):
                started = time.perf_counter()
                model.head.logits(last)
                head_times.append(time.perf_counter() - started)
                started = time.perf_counter()
                model.head.embed(torch.tensor([[5]]))
                embed_times.append(time.perf_counter() - started)

    serialize_times = []
    for _ in range(200):
        started = time.perf_counter()
        serialize(torch.randn(1, 1, hidden_size))
        serialize_times.append(time.perf_counter() - started)
    compute = {}
    for text in spans:
        start, end = map(int, text.split(":"))
        span = load_span(checkpoint, start, end)
        cache, times = SpanCache(0, end - start, 16 + args.new_tokens), []
        with torch.inference_mode():
            span(torch.randn(1, 16, hidden_size), cache=cache)
            for position in range(16, 16 + args.new_tokens):
                started = time.perf_counter()
                span(
                    torch.randn(1, 1, hidden_size),
                    cache=cache,
                    position_ids=torch.tensor([[position]]),
                )
                times.append(time.perf_counter() - started)
        compute[text] = times
    per_token = timer.gaps()
    hops = {
        name: {
            "round_trip_ms": median_ms(times),
            "node_compute_ms": median_ms(compute[name]),
            "overhead_ms": round(median_ms(times) - median_ms(compute[name]), 3),
        }
        for name, times in hop_times.items()
    }
    accounted = (
        sum(h["round_trip_ms"] for h in hops.values()) + median_ms(head_times) + median_ms(embed_times)
    )
    print(
        json.dumps(
            {
                "name": "token_profile",
                "model": checkpoint.name,
                "device": "cpu",
                "nodes": args.nodes,
                "per_token_ms": median_ms(per_token),
                "client_lm_head_ms": median_ms(head_times),
                "client_embed_ms": median_ms(embed_times),
                "serialize_hidden_ms": median_ms(serialize_times),
                "hops": hops,
                "unaccounted_client_ms": round(median_ms(per_token) - accounted, 3),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
