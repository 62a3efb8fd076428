"""`swarm run`: training-run files. Every participant of a run is given the same file.

Each sub-subcommand has an `add_<name>_parser(sub)` and a `run_<name>(args)`; register new ones in
`add_parser`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from swarm.cli.common import add_cache_dir
from swarm.training.run import (
    DATA_ORDERS,
    AveragingSettings,
    BatchSettings,
    OptimizerSettings,
    RunConfig,
    RunFileError,
)

_OPTIMIZER = OptimizerSettings()
_BATCH = BatchSettings()
_AVERAGING = AveragingSettings()
_RUN = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "run",
        help="create training-run files",
        description="A training run is a file: every stage node and trainer is given the same TOML file, "
        "and only peers whose files have the same sha256 train together.",
    )
    sub = parser.add_subparsers(dest="run_command", required=True, metavar="RUN_COMMAND")
    add_init_parser(sub)
    return parser


def fail(command: str, message: object) -> int:
    """One line on stderr, in argparse's style, and argparse's exit code for bad input."""
    text = " ".join(str(message).split())
    print(f"swarm run {command}: error: {text}", file=sys.stderr)
    return 2


def add_init_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "init",
        help="write a new run file for a model split into stages",
        description="Resolve the model, hash its blocks, split them into equal stages and write the run "
        "file. Prints the file's sha256 and path (the format of sha256sum).",
    )
    parser.add_argument("--run-id", required=True, help="name of the run: 1-64 letters, digits, '_' or '-'")
    parser.add_argument("--model", required=True, help="built-in name, HF checkpoint folder or .gguf file")
    parser.add_argument(
        "--model-name", default=None, help="name in the DHT (default: built-in name or folder name)"
    )
    parser.add_argument("--stages", type=int, required=True, metavar="K", help="number of pipeline stages")
    parser.add_argument("--out", required=True, help="where to write the run file (TOML)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_cache_dir(parser)

    optimizer = parser.add_argument_group("optimizer (AdamW)")
    optimizer.add_argument("--lr", type=float, default=_OPTIMIZER.lr, help="learning rate")
    optimizer.add_argument(
        "--betas", type=float, nargs=2, default=_OPTIMIZER.betas, metavar=("BETA1", "BETA2")
    )
    optimizer.add_argument("--eps", type=float, default=_OPTIMIZER.eps)
    optimizer.add_argument("--weight-decay", type=float, default=_OPTIMIZER.weight_decay)
    optimizer.add_argument(
        "--clip-grad-norm", type=float, default=_OPTIMIZER.clip_grad_norm, help="max gradient norm (0: off)"
    )

    batch = parser.add_argument_group("batches")
    batch.add_argument(
        "--target-batch-size",
        type=int,
        default=_BATCH.target_batch_size,
        help="samples per optimizer step, over all trainers",
    )
    batch.add_argument(
        "--microbatch-size", type=int, default=_BATCH.microbatch_size, help="samples per pipeline pass"
    )
    batch.add_argument("--seq-len", type=int, default=_BATCH.seq_len, help="tokens per sample")
    batch.add_argument(
        "--max-steps", type=int, default=_BATCH.max_steps, help="stop after this many steps (default: never)"
    )
    batch.add_argument(
        "--sync",
        action=argparse.BooleanOptionalAction,
        default=_RUN["sync"],
        help="every step waits for the whole target batch and a full average",
    )
    batch.add_argument("--data-order", choices=DATA_ORDERS, default=_RUN["data_order"])
    batch.add_argument("--seed", type=int, default=_RUN["seed"])

    averaging = parser.add_argument_group("averaging (within a stage)")
    averaging.add_argument(
        "--matchmaking-time",
        type=float,
        default=_AVERAGING.matchmaking_time,
        help="seconds to gather a group",
    )
    averaging.add_argument(
        "--averaging-timeout",
        type=float,
        default=_AVERAGING.averaging_timeout,
        help="seconds one round may take",
    )
    averaging.add_argument(
        "--request-timeout",
        type=float,
        default=_AVERAGING.request_timeout,
        help="seconds to wait for a peer during matchmaking",
    )
    averaging.add_argument("--aggregator", default=_AVERAGING.aggregator)
    averaging.add_argument(
        "--tau", type=float, default=_AVERAGING.tau, help="how far to move towards the average (1: all)"
    )
    parser.set_defaults(func=run_init)
    return parser


def _flag(field: str) -> str:
    # "optimizer.betas[1]" -> "argument --betas: ": name the flag to fix, not only the field of the file
    if field.startswith("model."):  # derived from --model, not given as such
        return ""
    name = field.split(".")[-1].split("[")[0]
    return f"argument --{name.replace('_', '-')}: "


def run_init(args: argparse.Namespace) -> int:
    from swarm.training.run import make_run, write_run

    out = Path(args.out)
    if out.exists() and not args.force:
        # peers already given the old file would no longer match it
        return fail("init", f"{out} exists; pass --force to replace it")
    settings = {
        name: getattr(args, name)
        for cls in (OptimizerSettings, BatchSettings, AveragingSettings)
        for name in (f.name for f in dataclasses.fields(cls))
    }
    try:
        run = make_run(
            args.run_id,
            args.model,
            args.stages,
            cache_dir=args.cache_dir,
            model_name=args.model_name,
            sync=args.sync,
            data_order=args.data_order,
            seed=args.seed,
            **settings,
        )
    except RunFileError as e:
        return fail("init", _flag(e.field) + str(e))
    except (ValueError, OSError, KeyError) as e:  # unknown or unsupported model, unreadable checkpoint
        return fail("init", e)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sha256 = write_run(run, out)
    except OSError as e:
        return fail("init", e)
    print(f"{sha256}  {out}")
    return 0
