"""Where a node's time goes while it serves decode steps: py-spy samples one node of a local swarm (the
middle one of 3 by default) while a client generates in a loop, and the samples are grouped by what the
node was doing (the span's compute, its KV-cache writes, tensor (de)serialization, protobuf, the P2P
daemon's I/O, the event loop). Prints one JSON object; needs `py-spy` on PATH (pip install py-spy).

    python -m benchmarks.profile_hop --nodes 3 --seconds 15             # a tiny random Llama (6 blocks)
    python -m benchmarks.profile_hop --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

# what a sampled stack was doing, by the first of these frames found from its innermost frame outwards
BUCKETS = [
    ("kv_cache_update", ("kv_cache.py", "cache_utils.py")),
    ("deserialize", ("deserialize_torch_tensor", "deserialize_checked")),  # before "serialize": a substring
    ("serialize", ("serialize_torch_tensor", "serialize (")),
    ("span_compute", ("span.py",)),
    ("protobuf", ("protobuf", "SerializeToString", "FromString", "ParseFromString")),
    ("p2p_io", ("hivemind/p2p",)),
    ("event_loop", ("asyncio", "uvloop")),
]


def bucket_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, needles in BUCKETS:
            if any(needle in frame for needle in needles):
                return name
    return "other"


def summarize(raw_lines: list[str], top: int) -> dict:
    """Sample shares by bucket and the functions most often on top of active stacks."""
    buckets: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        count = int(count)
        total += count
        buckets[bucket_of(stack)] += count
        leaves[stack.split(";")[-1]] += count
    share = {name: round(n / total, 3) for name, n in buckets.most_common()} if total else {}
    return {
        "samples": total,
        "share_by_activity": share,
        "top_functions": [[name, round(n / total, 3)] for name, n in leaves.most_common(top)],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="a model name or path (default: a tiny random Llama)")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--node", type=int, default=None, help="which node to sample (default: the middle)")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--label", default="", help="a note for the results row (e.g. before/after)")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        parser.error("needs py-spy (pip install py-spy)")

    from benchmarks.common import random_token_ids
    from swarm.client import DistributedModelForCausalLM
    from swarm.local import LocalSwarm, split_blocks
    from swarm.models.checkpoint import resolve_checkpoint
    from swarm.models.tiny import write_tiny_llama

    with tempfile.TemporaryDirectory(prefix="swarm-profile-hop-") as workdir:
        model = args.model or str(write_tiny_llama(Path(workdir) / "tiny-llama", num_blocks=6))
        checkpoint = resolve_checkpoint(model)
        input_ids = random_token_ids(checkpoint, 1, 16)
        with LocalSwarm(workdir=Path(workdir) / "swarm") as swarm:
            swarm.start_bootstrap()
            nodes = swarm.start_nodes(model, split_blocks(checkpoint.num_blocks, args.nodes))
            target = nodes[args.node if args.node is not None else len(nodes) // 2]
            raw_path = Path(workdir) / "samples.txt"
            with DistributedModelForCausalLM.from_pretrained(model, swarm.initial_peers) as client:
                stop, tokens = threading.Event(), [0]

                def generate() -> None:
                    while not stop.is_set():
                        with client.inference_session(max_length=16 + 64) as session:
                            client.generate(input_ids, max_new_tokens=64, session=session, eos_token_id=[])
                        tokens[0] += 64

                client.generate(input_ids, max_new_tokens=4)  # warm up routes and caches
                worker = threading.Thread(target=generate, daemon=True)
                worker.start()
                started = time.perf_counter()
                subprocess.run(
                    [
                        py_spy,
                        "record",
                        "--pid",
                        str(target.pid),
                        "--duration",
                        str(int(args.seconds)),
                        "--rate",
                        str(args.rate),
                        "--format",
                        "raw",
                        "--nonblocking",
                        "--output",
                        str(raw_path),
                    ],
                    check=True,
                    capture_output=True,
                )
                elapsed = time.perf_counter() - started
                stop.set()
                worker.join(120)
                generated = tokens[0]
            summary = summarize(raw_path.read_text().splitlines(), args.top)
    print(
        json.dumps(
            {
                "name": "hop_profile",
                "label": args.label,
                "model": checkpoint.name,
                "device": "cpu",
                "client_torch_threads": torch.get_num_threads(),  # nodes: 1 each (deterministic)
                "nodes": args.nodes,
                "sampled_node": target.name,
                "seconds": round(elapsed, 1),
                "tokens_generated_while_sampling_approx": generated,
                **summary,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
