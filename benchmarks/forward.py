"""Forward throughput: tokens/s for a batch of 8 x 512 tokens through a local swarm against a local
transformers forward on the same weights, in one run. Prints one JSON object per node count.

    python -m benchmarks.forward --model smollm2-135m-instruct --batch 8 --seq 512 --nodes 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--nodes", type=int, nargs="+", default=[3])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from swarm.client import DistributedModelForCausalLM
    from swarm.local import LocalSwarm, split_blocks
    from swarm.models.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.model)
    input_ids = torch.randint(
        10, checkpoint.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )
    tokens = args.batch * args.seq

    def best_time(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    local = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32).eval()
    with torch.no_grad():
        local_time = best_time(lambda: local(input_ids))
    for nodes in args.nodes:
        with LocalSwarm() as swarm:
            swarm.start_bootstrap()
            swarm.start_nodes(args.model, split_blocks(checkpoint.num_blocks, nodes))
            with DistributedModelForCausalLM.from_pretrained(args.model, swarm.initial_peers) as model:
                with torch.no_grad():
                    swarm_time = best_time(lambda model=model: model(input_ids))
        print(
            json.dumps(
                {
                    "name": "forward",
                    "model": checkpoint.name,
                    "device": "cpu",
                    "dtype": "float32",
                    "nodes": nodes,
                    "batch": args.batch,
                    "seq": args.seq,
                    "local_tokens_per_s": round(tokens / local_time, 1),
                    "swarm_tokens_per_s": round(tokens / swarm_time, 1),
                    "ratio": round(local_time / swarm_time, 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
