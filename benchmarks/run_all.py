"""Run every benchmark in turn; each prints JSON lines. `--quick` uses small sizes.

The WAN benchmark needs the netns harness (root, iproute2) and the GPU benchmark a CUDA device; where
one can't run, a JSON line says so instead of leaving it out silently.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks import (
    byzantine,
    concurrency,
    finetune,
    forward,
    gateway,
    gpu,
    inference,
    models,
    openai_api,
    recovery,
    relay,
    training,
    verification,
    wan,
)


def skipped(name: str, reason: str) -> None:
    print(json.dumps({"name": name, "skipped": reason}), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args(argv)
    model = ["--model", args.model]
    if args.quick:
        inference.main([*model, "--nodes", "1", "3", "--new-tokens", "8", "--repeats", "1"])
        recovery.main([*model, "--new-tokens", "12"])
        forward.main([*model, "--batch", "2", "--seq", "128", "--repeats", "1"])
        finetune.main([*model, "--steps", "2", "--batch", "4", "--seq", "16"])
        training.main(["--quick"])  # its own tiny random Llama, not --model
        gateway.main([*model, "--nodes", "1", "--new-tokens", "8", "--repeats", "1"])
        openai_api.main([*model, "--nodes", "1", "--new-tokens", "8", "--repeats", "1", "--concurrent", "2"])
        models.main(["--quant", "none", "int8", "--blocks", "4", "--new-tokens", "8", "--repeats", "1"])
        concurrency.main(["--model", "tiny", "--clients", "1", "8", "--new-tokens", "8", "--repeats", "1"])
    else:
        inference.main(
            [
                *model,
                "--nodes",
                "1",
                "2",
                "3",
                "--new-tokens",
                "32",
                "--repeats",
                "2",
                "--decoding-loop",
                "both",
            ]
        )
        recovery.main([*model, "--new-tokens", "32"])
        forward.main([*model, "--nodes", "1", "3", "--batch", "8", "--seq", "512"])
        finetune.main([*model, "--steps", "5", "--batch", "8", "--seq", "32"])
        training.main(["--steps", "8"])
        gateway.main([*model, "--nodes", "2", "--new-tokens", "32", "--repeats", "3"])
        openai_api.main([*model, "--nodes", "2", "--new-tokens", "32", "--repeats", "3", "--concurrent", "8"])
        # node weights: bytes per block, tokens/s and logit error of --quant none and int8 (2 nodes each)
        models.main(["--quant", "none", "int8", *model, "--new-tokens", "16", "--repeats", "2"])
        # 8 concurrent clients on one node against 1, without and with --batch-decode
        concurrency.main(["--model", "tiny", "--clients", "1", "8", "--new-tokens", "32", "--repeats", "3"])
        concurrency.main([*model, "--clients", "1", "8", "--new-tokens", "32", "--repeats", "2"])

    from swarm.testing.netns import unavailable_reason

    if reason := unavailable_reason():
        skipped("inference_wan", reason)
    else:
        wan.main(
            [*model, "--new-tokens", "8" if args.quick else "32", "--repeats", "1" if args.quick else "2"]
        )
    from swarm.testing.netns import nat_unavailable_reason

    if reason := nat_unavailable_reason():
        skipped("relay_cost", reason)
    else:
        relay.main(
            [*model, "--new-tokens", "8" if args.quick else "32", "--repeats", "1" if args.quick else "2"]
        )
    if not torch.cuda.is_available():
        skipped("gpu", "no CUDA device")
    elif args.quick:
        gpu.main(["--nodes", "3", "--new-tokens", "16", "--repeats", "1", "--skip-forward"])
    else:
        gpu.main([])
    # it exits with an error when an honest node was convicted or the cheater went free, after every row;
    # byzantine still runs, and the error is raised after it
    failed = None
    try:
        verification.main([*model, "--quick"] if args.quick else [*model, "--new-tokens", "32"])
    except SystemExit as e:
        if e.code != 1:  # Ctrl-C / SIGTERM: stop here
            raise
        failed = e
    # last: it exits with an error when an honest peer was banned, after printing every row
    byzantine.main(["--quick"] if args.quick else [])  # its own small MLP and data, not --model
    if failed is not None:
        raise failed


if __name__ == "__main__":
    main()
