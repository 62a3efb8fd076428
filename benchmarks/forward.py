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

from benchmarks.common import device_name, random_token_ids, release_memory, start_split_swarm


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--nodes", type=int, nargs="+", default=[3])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from swarm.client import DistributedModelForCausalLM
    from swarm.local import LocalSwarm
    from swarm.models.checkpoint import resolve_checkpoint
    from swarm.utils.tensors import FLOAT_DTYPES

    dtype = FLOAT_DTYPES[args.dtype]
    synchronize = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None

    checkpoint = resolve_checkpoint(args.model)
    input_ids = random_token_ids(checkpoint, args.batch, args.seq)
    tokens = args.batch * args.seq

    def best_time(fn) -> float:
        fn()  # warm-up
        synchronize()
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            fn()
            synchronize()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    def local_time() -> float:
        local = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=dtype).to(args.device).eval()
        local_ids = input_ids.to(args.device)
        with torch.no_grad():
            return best_time(lambda: local(local_ids))

    local_seconds = local_time()
    release_memory(args.device)
    for nodes in args.nodes:
        with LocalSwarm() as swarm:
            start_split_swarm(swarm, args.model, checkpoint.num_blocks, nodes, args.device, args.dtype)
            with DistributedModelForCausalLM.from_pretrained(
                args.model, swarm.initial_peers, dtype=dtype, device=args.device
            ) as model:
                with torch.no_grad():
                    swarm_time = best_time(lambda model=model: model(input_ids))
        print(
            json.dumps(
                {
                    "name": "forward",
                    "model": checkpoint.name,
                    "device": args.device,
                    "dtype": args.dtype,
                    "device_name": device_name(args.device),
                    "nodes": nodes,
                    "batch": args.batch,
                    "seq": args.seq,
                    "local_tokens_per_s": round(tokens / local_seconds, 1),
                    "swarm_tokens_per_s": round(tokens / swarm_time, 1),
                    "ratio": round(local_seconds / swarm_time, 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
