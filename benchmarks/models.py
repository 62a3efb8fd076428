"""Greedy generation per model family: a 2-node swarm against local transformers, in one run.

For each family's tiny random config (swarm.models.tiny.write_tiny_family: 3 blocks, hidden 64), the
same prompt is generated locally with `AutoModelForCausalLM` and through 2 nodes splitting the blocks.
Prints one JSON object per family: tokens/s of both, their ratio, and whether the tokens were equal.
Tiny models measure per-token overheads (hops and RPCs for the swarm, generate()'s own per-step work
locally), not compute. The local model runs on `--local-threads` (1: a tiny model gains nothing from more,
and on a shared machine spinning threads would slow it down).

    python -m benchmarks.models --families llama gemma2 mixtral --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from benchmarks.common import device_name, run_until_sigterm, start_split_swarm
from swarm.models.families import SUPPORTED_MODEL_TYPES


def tokens_per_s(generate, new_tokens: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Best of `repeats` timed runs after one warm-up; the last run's tokens."""
    out = generate()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        out = generate()
        best = min(best, time.perf_counter() - started)
    return new_tokens / best, out


def measure_family(model_type: str, workdir: Path, args) -> dict:
    from transformers import AutoModelForCausalLM

    from swarm.client import DistributedModelForCausalLM
    from swarm.local import LocalSwarm
    from swarm.models.tiny import write_tiny_family

    path = write_tiny_family(workdir / f"tiny-{model_type}", model_type, num_blocks=args.blocks)
    input_ids = torch.randint(3, 256, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        local_rate, expected = tokens_per_s(
            partial(local.generate, input_ids, **kwargs), args.new_tokens, args.repeats
        )
    with LocalSwarm(workdir=workdir / f"swarm-{model_type}") as swarm:
        start_split_swarm(swarm, str(path), args.blocks, 2, "cpu", "float32")
        with DistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers) as model:
            swarm_rate, out = tokens_per_s(
                partial(model.generate, input_ids, **kwargs), args.new_tokens, args.repeats
            )
    return {
        "name": "models",
        "family": model_type,
        "device": "cpu",
        "dtype": "float32",
        "device_name": device_name("cpu"),
        "blocks": args.blocks,
        "nodes": 2,
        "new_tokens": args.new_tokens,
        "local_threads": args.local_threads,
        "local_tokens_per_s": round(local_rate, 2),
        "swarm_tokens_per_s": round(swarm_rate, 2),
        "ratio": round(swarm_rate / local_rate, 3),
        "same_tokens": bool(torch.equal(out, expected)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", nargs="+", default=list(SUPPORTED_MODEL_TYPES))
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--local-threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.local_threads)

    def measure():
        with tempfile.TemporaryDirectory(prefix="swarm-bench-models-") as workdir:
            for model_type in args.families:
                print(json.dumps(measure_family(model_type, Path(workdir), args)), flush=True)

    run_until_sigterm(measure)


if __name__ == "__main__":
    main()
