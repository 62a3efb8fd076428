"""Greedy generation per model family: a 2-node swarm against local transformers, in one run.

For each family's tiny random config (swarm.models.tiny.write_tiny_family: 3 blocks, hidden 64), the
same prompt is generated locally with `AutoModelForCausalLM` and through 2 nodes splitting the blocks.
Prints one JSON object per family: tokens/s of both, their ratio, and whether the tokens were equal.
Tiny models measure per-token overheads (hops and RPCs for the swarm, generate()'s own per-step work
locally), not compute. The local model runs on `--local-threads` (1: a tiny model gains nothing from more,
and on a shared machine spinning threads would slow it down).

    python -m benchmarks.models --families llama gemma2 mixtral --new-tokens 32

With `--quant none int8 [nf4]` it compares weights instead of families, on `--model` (the tiny Llama, or a
built-in name such as smollm2-135m-instruct) served by 2 nodes started with each `--quant` in turn: one
JSON object per quant with the bytes per block the nodes measured from their loaded tensors (and the
ratio to `none`), greedy tokens/s of the swarm and of local fp32 transformers, the relative logit error
||swarm - local|| / ||local|| over the prompt, and whether the greedy tokens equal local ones.

    python -m benchmarks.models --quant none int8 --model smollm2-135m-instruct --new-tokens 16
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


def measure_quants(workdir: Path, args) -> list[dict]:
    """One row per --quant: memory, speed and error of a 2-node swarm against local fp32 transformers."""
    from transformers import AutoModelForCausalLM

    from swarm.client import DistributedModelForCausalLM
    from swarm.local import LocalSwarm, split_blocks
    from swarm.models.checkpoint import resolve_checkpoint
    from swarm.models.tiny import write_tiny_llama

    source = args.model
    if source == TINY:
        source = str(write_tiny_llama(workdir / "tiny-llama", num_blocks=args.blocks))
    checkpoint = resolve_checkpoint(source)
    input_ids = torch.randint(3, 256, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    local = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = local(input_ids).logits
        local_rate, expected = tokens_per_s(
            partial(local.generate, input_ids, **kwargs), args.new_tokens, args.repeats
        )
    rows = []
    for quant in args.quant:
        with LocalSwarm(workdir=workdir / f"swarm-{quant}") as swarm:
            swarm.start_bootstrap()
            spans = split_blocks(checkpoint.num_blocks, 2)
            swarm.start_nodes(source, spans, "--quant", quant, "--throughput", "10")
            with DistributedModelForCausalLM.from_pretrained(
                source, swarm.initial_peers, allowed_quant=[quant]
            ) as model:
                with torch.no_grad():
                    logits = model(input_ids).logits
                swarm_rate, out = tokens_per_s(
                    partial(model.generate, input_ids, **kwargs), args.new_tokens, args.repeats
                )
                servers = model.swarm.usable_servers(refresh=True)
        blocks = sum(s.end_block - s.start_block for s in servers)
        per_block = sum(s.bytes_per_block * (s.end_block - s.start_block) for s in servers) / blocks
        rows.append(
            {
                "name": "models_quant",
                "model": checkpoint.name,
                "quant": quant,
                "device": "cpu",
                "dtype": "float32",
                "device_name": device_name("cpu"),
                "blocks": checkpoint.num_blocks,
                "nodes": 2,
                "new_tokens": args.new_tokens,
                "local_threads": args.local_threads,
                "bytes_per_block": round(per_block),
                "local_tokens_per_s": round(local_rate, 2),
                "swarm_tokens_per_s": round(swarm_rate, 2),
                "ratio": round(swarm_rate / local_rate, 3),
                "relative_logit_error": float(f"{float((logits - reference).norm() / reference.norm()):.3g}"),
                "same_tokens": bool(torch.equal(out, expected)),
            }
        )
    full = next((row["bytes_per_block"] for row in rows if row["quant"] == "none"), None)
    for row in rows:
        row["bytes_ratio_to_none"] = round(row["bytes_per_block"] / full, 3) if full else None
    return rows


TINY = "tiny-llama"


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
    parser.add_argument(
        "--quant",
        nargs="+",
        choices=("none", "int8", "nf4"),
        default=None,
        help="compare these node weights on --model instead of the families",
    )
    parser.add_argument(
        "--model", default=TINY, help=f"with --quant: {TINY} (random, --blocks blocks) or a built-in name"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.local_threads)

    def measure():
        with tempfile.TemporaryDirectory(prefix="swarm-bench-models-") as workdir:
            if args.quant:
                for row in measure_quants(Path(workdir), args):
                    print(json.dumps(row), flush=True)
                return
            for model_type in args.families:
                print(json.dumps(measure_family(model_type, Path(workdir), args)), flush=True)

    run_until_sigterm(measure)


if __name__ == "__main__":
    main()
