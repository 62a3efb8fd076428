"""`swarm train`: join a run as a trainer (embeddings, norm and LM head) and drive data through its stages."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import ExitStack
from pathlib import Path

from swarm.cli.common import add_announce_maddrs, add_cache_dir, add_initial_peers
from swarm.testing.faults import TRAINER, FaultError, add_fault_argument, fault_for

logger = logging.getLogger(__name__)

# SwarmTrainer's defaults, kept here so that `--help` needs no torch (a test checks they agree)
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 0
DEFAULT_UPDATE_PERIOD = 5.0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a run's model as a trainer, with the run's stage nodes",
        description="Join the run given by --run as a trainer: hold the embeddings, final norm and LM head, "
        "send microbatches of --data through the stage nodes (`swarm node --train RUN_FILE`) and step "
        "together with the other trainers.",
    )
    parser.add_argument(
        "--run", required=True, metavar="RUN_FILE", help="the run file (from `swarm run init`)"
    )
    parser.add_argument("--data", required=True, metavar="FILE", help="text file to train on")
    add_initial_peers(parser)
    parser.add_argument(
        "--max-steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help="stop after this trainer's N-th step (default: the run's max_steps, else never)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON line per step and nothing else on stdout"
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (peers reach trainers)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0: any free port)")
    add_announce_maddrs(parser)
    parser.add_argument(
        "--identity", default=None, help="file with this trainer's identity (created if missing)"
    )
    add_cache_dir(parser)
    add_fault_argument(parser)
    parser.add_argument(
        "--export", default=None, metavar="DIR", help="at the end, write the whole model to this HF folder"
    )
    parser.add_argument("--force", action="store_true", help="replace --export DIR if it is not empty")
    parser.add_argument(
        "--update-period",
        type=float,
        default=DEFAULT_UPDATE_PERIOD,
        help="seconds between DHT announcements; records expire after twice that",
    )
    parser.set_defaults(func=run)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def fail(message: object, code: int = 2) -> int:
    """One line on stderr, in argparse's style."""
    print(f"swarm train: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


class StepPrinter:
    """What `swarm train` shows per step: a JSON line, a progress bar on a terminal, or nothing extra.

    Without --json and a terminal, the trainer's own log line per step is the output.
    """

    def __init__(self, as_json: bool, total: int | None, verbose: bool = False):
        self.as_json, self.bar = as_json, None
        self._stack = ExitStack()
        if not as_json and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
            self._stack.enter_context(logging_redirect_tqdm())  # log lines above the bar, not through it
            if not verbose:  # the bar shows each step; per-step log lines would only repeat it
                training = logging.getLogger("swarm.training")
                level = training.level
                training.setLevel(logging.WARNING)
                self._stack.callback(training.setLevel, level)

    def __call__(self, step) -> None:
        if self.as_json:
            print(json.dumps(step.as_dict()), flush=True)
        elif self.bar is not None:
            self.bar.set_postfix(loss=f"{step.loss:.4f}", samples_per_s=f"{step.samples_per_s:.1f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._stack.close()


def run(args: argparse.Namespace) -> int:
    from swarm.training.run import load_run

    try:
        fault = fault_for(args.fault, TRAINER) if args.fault else None
    except FaultError as e:
        return fail(e, code=2)
    try:
        loaded = load_run(args.run)
    except (ValueError, OSError) as e:
        return fail(e)
    if not Path(args.data).is_file():
        return fail(f"argument --data: {args.data} is not a file")
    export_dir = Path(args.export) if args.export else None
    if export_dir is not None and not args.force and _occupied(export_dir):
        # found out now, not after the training it would have thrown away
        return fail(f"argument --export: {export_dir} exists; pass --force to replace it")

    from swarm.training.trainer import SwarmTrainer

    trainer = printer = None
    try:
        trainer = SwarmTrainer(
            loaded,
            args.initial_peers,
            data=args.data,
            cache_dir=args.cache_dir,
            host=args.host,
            port=args.port,
            announce_maddrs=tuple(args.announce_maddrs),
            identity_path=args.identity,
            update_period=args.update_period,
            fault=fault,
        )
        printer = StepPrinter(
            args.json, args.max_steps or loaded.config.batch.max_steps, getattr(args, "verbose", False)
        )
        trainer.train(args.max_steps, on_step=printer)
        printer.close()
        if export_dir is not None:
            try:
                _export(trainer, export_dir, args)
            except (ValueError, OSError) as e:  # the stages' state does not fit the model; a full disk
                return fail(f"export to {export_dir} failed: {e}", code=1)
        return 0
    except KeyboardInterrupt:
        print("swarm train: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, ValueError) as e:  # a stage stopped answering; data too short for the run
        return fail(e, code=1)
    finally:
        if printer is not None:
            printer.close()
        if trainer is not None:
            trainer.close()


def _export(trainer, export_dir: Path, args: argparse.Namespace) -> None:
    """Write the whole model: the stages' blocks from their peers, the head from this trainer."""
    from swarm.training.export import collect_run_state, write_hf_folder

    client = trainer.client
    tensors, summary = collect_run_state(
        client.dht, client.p2p, trainer.run, client.run_async, head=trainer.head_state()
    )
    write_hf_folder(trainer.checkpoint, tensors, export_dir, overwrite=args.force)
    lines = [
        f"exported stage {s['stage']} from {s['peer_id']} at step {s['step']}" for s in summary["stages"]
    ]
    lines.append(f"exported the head at step {summary['trainer']['step']} to {export_dir}")
    for line in lines:
        if args.json:  # stdout carries only the steps' JSON lines
            logger.info("%s", line)
        else:
            print(line)


def _occupied(path: Path) -> bool:
    return path.is_symlink() or path.is_file() or (path.is_dir() and any(path.iterdir()))
