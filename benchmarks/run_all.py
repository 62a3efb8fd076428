"""Run every benchmark in turn; each prints JSON lines. `--quick` uses small sizes."""

from __future__ import annotations

import argparse

from benchmarks import finetune, forward, inference, recovery


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
    else:
        inference.main([*model, "--nodes", "1", "2", "3", "--new-tokens", "32", "--repeats", "2"])
        recovery.main([*model, "--new-tokens", "32"])
        forward.main([*model, "--nodes", "1", "3", "--batch", "8", "--seq", "512"])
        finetune.main([*model, "--steps", "5", "--batch", "8", "--seq", "32"])


if __name__ == "__main__":
    main()
