"""`swarm run`: training-run files. Every participant of a run is given the same file.

Each sub-subcommand has an `add_<name>_parser(sub)` and a `run_<name>(args)`; register new ones in
`add_parser`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from swarm.cli.common import add_cache_dir, add_initial_peers
from swarm.training.run import (
    AGGREGATORS,
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
        help="create, inspect and export training runs",
        description="A training run is a file: every stage node and trainer is given the same TOML file, "
        "and only peers whose files have the same sha256 train together.",
    )
    sub = parser.add_subparsers(dest="run_command", required=True, metavar="RUN_COMMAND")
    add_init_parser(sub)
    add_export_parser(sub)
    add_status_parser(sub)
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
    averaging.add_argument(
        "--aggregator",
        default=_AVERAGING.aggregator,
        choices=AGGREGATORS,
        help="how a group combines its gradients: centered_clip is BTARD's robust rule, with commitments, "
        "checks and bans; mean trusts every peer",
    )
    averaging.add_argument(
        "--tau", type=float, default=_AVERAGING.tau, help="CenteredClip's clipping radius per chunk"
    )
    averaging.add_argument(
        "--validators",
        type=int,
        default=_AVERAGING.validators,
        help="members of each group (a stage, the trainers) that recompute another member's gradient each "
        "round (0: no gradient validation)",
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


def add_run_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", required=True, metavar="RUN_FILE", help="the run file (from `swarm run init`)"
    )


def add_export_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "export",
        help="download a run's trained model into a Hugging Face folder",
        description="Join the swarm as a client, download every stage's blocks from its live peer with the "
        "highest step and the embeddings, norm and LM head from a live trainer, and write a Hugging Face "
        "folder that `swarm node --model DIR` and transformers load.",
    )
    add_run_file(parser)
    add_initial_peers(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for one peer's state (default: 120)"
    )
    add_cache_dir(parser)
    parser.set_defaults(func=run_export)
    return parser


def run_export(args: argparse.Namespace) -> int:
    from swarm.training.export import export_run
    from swarm.training.run import load_run

    try:
        run = load_run(args.run)
    except (ValueError, OSError) as e:
        return fail("export", e)
    out = Path(args.out)
    if out.exists() and not args.force and (not out.is_dir() or any(out.iterdir())):
        return fail("export", f"{out} exists; pass --force to replace it")
    try:
        summary = export_run(
            run, args.initial_peers, out, args.cache_dir, timeout=args.timeout, overwrite=args.force
        )
    except RuntimeError as e:  # a stage or the trainers did not answer: nothing was written
        print(f"swarm run export: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except (ValueError, OSError, KeyError) as e:  # unreadable checkpoint, state that does not fit the model
        return fail("export", e)
    for stage in summary["stages"]:
        start, end = run.config.stages[stage["stage"]]
        print(f"stage {stage['stage']} (blocks {start}:{end}): {stage['peer_id']} at step {stage['step']}")
    trainer = summary["trainer"]
    print(f"head: {trainer['peer_id']} at step {trainer['step']}")
    print(f"wrote {summary['out_dir']}")
    return 0


def add_status_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "status",
        help="show the stage peers and trainers of a run",
        description="Read the run's records from the DHT: every stage's peers (state, step, samples "
        "toward the next step, throughput, queue), the trainers and the peers banned from the run (each "
        "accusation re-checked here). Only records of this run file's sha256 are shown.",
    )
    add_run_file(parser)
    add_initial_peers(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the DHT")
    parser.set_defaults(func=run_status)
    return parser


def _state_name(state: int) -> str:
    from swarm.proto import swarm_pb2

    try:
        return swarm_pb2.ServerInfo.State.Name(state)
    except ValueError:  # a peer running newer code may announce a state this one does not know
        return str(state)


def run_status_dict(dht, run, timeout: float = 10.0, banned: list[dict] | None = None) -> dict:
    """The run's stage peers and trainers from the DHT, and its bans (see `judge_bans`), as printed by
    `swarm run status --json`."""
    from swarm.dht.swarm_view import read_stage, read_trainers

    config = run.config
    stages = []
    for stage, (start, end) in enumerate(config.stages):
        records = read_stage(dht, config.run_id, stage, timeout)
        peers = [
            {
                "peer_id": info.peer_id,
                "state": _state_name(info.state),
                "step": info.step,
                "samples": info.samples,
                "throughput": info.throughput,
                "queue_length": info.queue_length,
            }
            for info in records.values()
            if info.run_hash == run.sha256
        ]
        peers.sort(key=lambda peer: (-peer["step"], peer["peer_id"]))
        stages.append({"stage": stage, "start": start, "end": end, "peers": peers})
    trainers = [
        {
            "peer_id": info.peer_id,
            "state": _state_name(info.state),
            "step": info.step,
            "samples": info.samples,
            "samples_per_s": info.samples_per_s,
        }
        for info in read_trainers(dht, config.run_id, timeout).values()
        if info.run_hash == run.sha256
    ]
    trainers.sort(key=lambda trainer: (-trainer["step"], trainer["peer_id"]))
    return {
        "run_id": config.run_id,
        "run_hash": run.sha256,
        "stages": stages,
        "trainers": trainers,
        "banned": list(banned or []),
    }


def judge_bans(dht, run) -> list[dict]:
    """The run's bans, judged here from its accusations as every member judges them."""
    import asyncio

    from swarm.training.bans import RunBans

    async def judge() -> list[dict]:
        bans = RunBans(dht, await dht.replicate_p2p(), run)
        await bans.refresh()
        return bans.as_json()

    return asyncio.run(judge())


def format_status(status: dict) -> str:
    """`swarm run status` as text."""
    lines = [f"run {status['run_id']} ({status['run_hash'][:12]})"]
    for stage in status["stages"]:
        online = sum(peer["state"] == "ONLINE" for peer in stage["peers"])
        lines.append(f"stage {stage['stage']} (blocks {stage['start']}:{stage['end']}): {online} online")
        if not stage["peers"]:
            lines.append("  no peers")
        for peer in stage["peers"]:
            lines.append(
                f"  {peer['peer_id']}  {peer['state']:<7}  step {peer['step']}  {peer['samples']} samples  "
                f"{peer['throughput']:.1f} samples/s  queue {peer['queue_length']}"
            )
    lines.append(f"trainers: {sum(t['state'] == 'ONLINE' for t in status['trainers'])} online")
    if not status["trainers"]:
        lines.append("  no trainers")
    for trainer in status["trainers"]:
        lines.append(
            f"  {trainer['peer_id']}  {trainer['state']:<7}  step {trainer['step']}  "
            f"{trainer['samples']} samples  {trainer['samples_per_s']:.1f} samples/s"
        )
    lines.append(f"banned: {len(status['banned'])}")
    for ban in status["banned"]:
        lines.append(f"  {ban['peer_id']}  at step {ban['round']}: {ban['reason']}")
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    from swarm.dht.factory import create_dht
    from swarm.training.run import load_run

    try:
        run = load_run(args.run)
    except (ValueError, OSError) as e:
        return fail("status", e)
    dht, _ = create_dht(args.initial_peers, client_mode=True)
    try:
        status = run_status_dict(dht, run, args.timeout, judge_bans(dht, run))
    finally:
        dht.shutdown()
    print(json.dumps(status) if args.json else format_status(status))
    return 0
