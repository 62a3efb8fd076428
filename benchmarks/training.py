"""SWARM-parallel training throughput: a tiny random Llama split into stages served by `swarm node --train`
processes on 127.0.0.1, driven by SwarmTrainers in threads of this process, against plain transformers
training of the same model (AdamW, batches of the run's target batch size) in the same run.

Prints one JSON line per configuration (stages x peers per stage, trainers) and one for the time of a
GroupAverager round between 2 and 3 in-process peers on a stage's worth of parameters.

    python -m benchmarks.training --steps 8
    python -m benchmarks.training --quick          # 3 steps, hidden 128, 3 averaging rounds

Each configuration runs one warm-up optimizer step, then `--steps` measured ones; `swarm_samples_per_s`
is the samples whose forward and backward passes all trainers completed per second of wall time, from the
moment every trainer finished the warm-up step to the moment the last one finished its last step. The
averaging times come from the trainers' step reports and from the stage peers' logs.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch

from benchmarks.common import device_name, run_until_sigterm

CORPUS = Path(__file__).resolve().parents[1] / "examples" / "data" / "corpus.txt"
CONFIGS = ("1x1", "2x1", "2x2")  # peers per stage x trainers
# a stage peer's log line for each step it took (swarm.training.collaboration), e.g. "stage 0: step 3 (8 of
# the group's 16 samples here, 5.1 samples/s; 2 peers averaged in 0.53 s)"; older: "averaged over 2 peers"
STAGE_STEP_RE = re.compile(r"stage (\d+): step (\d+) \((.*)\)$", re.MULTILINE)
GROUP_SIZE_RE = re.compile(r"(\d+) peers")
AVERAGING_S_RE = re.compile(r"in ([0-9.]+) s\b")


def parse_config(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or min(int(match.group(1)), int(match.group(2))) < 1:
        raise argparse.ArgumentTypeError(f"expected PEERSxTRAINERS such as 2x1, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def mean(values) -> float | None:
    values = list(values)
    return round(statistics.fmean(values), 4) if values else None


def write_model(folder: Path, args) -> Path:
    from swarm.models.tiny import write_tiny_llama, write_tiny_tokenizer

    path = write_tiny_llama(
        folder / "tiny-train", num_blocks=args.blocks, seed=1, hidden_size=args.hidden, vocab_size=256
    )
    write_tiny_tokenizer(path, vocab_size=256)
    return path


def local_training(model_path: Path, run, data, steps: int, warmup: int) -> tuple[float, float]:
    """Plain transformers training: `warmup` steps, then `steps` timed ones on random batches of the
    run's target batch size. Returns (samples per second, last loss)."""
    from transformers import LlamaForCausalLM

    from swarm.training.reference import local_optimizer, local_step

    model = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32).train()
    optimizer = local_optimizer(model, run.optimizer)
    generator = torch.Generator().manual_seed(0)
    batch_size = run.batch.target_batch_size
    loss, times = None, []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        rows = torch.randint(len(data), (batch_size,), generator=generator)
        loss = local_step(model, optimizer, data.sequences[rows], run.optimizer.clip_grad_norm)
        times.append(time.perf_counter() - started)
    return batch_size * steps / sum(times[warmup:]), loss


def stage_rounds(processes, first: int) -> list[tuple[int, float]]:
    """(group size, seconds) of the averaging rounds the stage peers logged for their steps from `first` on
    (they step later than the trainers: their last rounds may still be under way when the trainers stop)."""
    rounds = []
    for process in processes:
        for match in STAGE_STEP_RE.finditer(process.log()):
            size, seconds = GROUP_SIZE_RE.search(match.group(3)), AVERAGING_S_RE.search(match.group(3))
            if int(match.group(2)) >= first and size and seconds:
                rounds.append((int(size.group(1)), float(seconds.group(1))))
    return rounds


def last_stage_step(process) -> int:
    """The last step a stage peer logged: stage peers step when the gradients of a target batch reached
    them, and their averaging rounds take time; in the asynchronous mode the trainers don't wait for that."""
    steps = [int(match.group(2)) for match in STAGE_STEP_RE.finditer(process.log())]
    return max(steps, default=0)


def count_samples(trainable, completed: list[tuple[float, int]]) -> None:
    """Record when each microbatch's samples reach a trainer's gradient sums (its last backward step).

    The samples a trainer reports per step are those since its previous step; when a trainer's averaging
    round fails and it waits, retries or loads the group's state, a step can carry samples processed long
    before the measured window, so the window counts the microbatches that finished within it instead.
    """
    accumulate = trainable.accumulate

    def counted(grads, samples: int) -> None:
        accumulate(grads, samples)
        if samples:
            completed.append((time.perf_counter(), samples))

    trainable.accumulate = counted


def run_configuration(run, peers: int, trainers: int, args) -> dict:
    from swarm.local import LocalSwarm
    from swarm.training.trainer import SwarmTrainer

    config = run.config
    total = args.warmup + args.steps
    swarm = LocalSwarm()
    running: list[SwarmTrainer] = []
    try:
        swarm.start_bootstrap()
        processes = [
            swarm.start_training_node(run.path, stage, "--update-period", "1", wait=False)
            for stage in range(config.num_stages)
            for _ in range(peers)
        ]
        for process in processes:
            swarm.wait_ready(process, timeout=300)
        concurrency = args.concurrency or 2 * peers
        for _ in range(trainers):
            running.append(
                SwarmTrainer(
                    run, swarm.initial_peers, data=CORPUS, update_period=1.0, concurrency=concurrency
                )
            )
        completed: list[tuple[float, int]] = []  # (when, samples) of each microbatch a trainer finished
        for trainer in running:
            count_samples(trainer.trainable, completed)
        reported: dict[tuple[int, int], float] = {}  # (trainer, step) -> when it was reported
        results: dict[int, list] = {}
        errors: dict[int, BaseException] = {}

        def train(index: int) -> None:
            def on_step(step) -> None:
                reported[index, step.step] = time.perf_counter()

            try:
                results[index] = running[index].train(total, on_step=on_step)
            except BaseException as e:  # reported by the main thread
                errors[index] = e

        threads = [threading.Thread(target=train, args=(i,), daemon=True) for i in range(trainers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=args.timeout)
        if errors:
            raise RuntimeError(f"a trainer failed: {next(iter(errors.values()))!r}")
        if sorted(results) != list(range(trainers)):
            raise TimeoutError(f"the trainers did not finish {total} steps in {args.timeout} s")

        # from when every trainer finished the warm-up to when the last one finished (a trainer that
        # loaded a step from another skips that step's report: take its first one at or past the warm-up)
        started = max(
            min(t for (i, step), t in reported.items() if i == index and step >= args.warmup)
            for index in range(trainers)
        )
        finished = max(reported.values())
        samples = sum(n for when, n in completed if started < when <= finished)
        wall = finished - started
        trainer_rounds = [
            r for t in running for r in t.collaboration.history if args.warmup < r.step <= total
        ]
        stage_log = stage_rounds(processes, args.warmup + 1)
        final_loss = statistics.fmean(results[i][-1].loss for i in range(trainers))
        return {
            "concurrency": concurrency,
            "samples": samples,
            "samples_per_step": round(samples / args.steps, 1),  # above the target: steps overlap compute
            "wall_s": round(wall, 3),
            "step_s": round(wall / args.steps, 3),
            "swarm_samples_per_s": round(samples / wall, 2),
            "mean_averaging_s_trainers": mean(r.averaging_s for r in trainer_rounds),
            "mean_group_size_trainers": mean(r.group_size for r in trainer_rounds),
            "mean_averaging_s_stages": mean(s for _, s in stage_log),
            "mean_group_size_stages": mean(g for g, _ in stage_log),
            "stage_steps": [last_stage_step(p) for p in processes],
            "final_loss": round(final_loss, 4),
        }
    finally:
        for trainer in running:
            trainer.close()
        swarm.close()


def averaging_round(templates: list[torch.Tensor], group_sizes: list[int], rounds: int, args) -> dict:
    """Median seconds of one GroupAverager round (the slowest member's call) per group size."""
    from swarm.averaging import GroupAverager
    from swarm.dht.factory import create_dht

    dhts, averagers = [], []
    medians, all_rounds, failed = [], [], []
    try:
        first, _ = create_dht()
        dhts.append(first)
        maddrs = [str(m) for m in first.get_visible_maddrs()]
        for _ in range(max(group_sizes) - 1):
            dhts.append(create_dht(maddrs)[0])
        wait_until_connected(dhts)
        for size in group_sizes:
            prefix = f"bench_{size}_{uuid.uuid4().hex[:8]}"
            group = [
                GroupAverager(
                    dht,
                    prefix,
                    templates,
                    min_matchmaking_time=args.matchmaking_time,
                    request_timeout=min(0.5, args.matchmaking_time / 2),
                )
                for dht in dhts[:size]
            ]
            averagers += group
            generator = torch.Generator().manual_seed(size)
            inputs = [[torch.randn(t.shape, generator=generator) for t in templates] for _ in group]

            times = timed_rounds(group, inputs, rounds + 1, args.averaging_timeout)[1:]  # 1st warms up
            for averager in group:
                averager.shutdown()
            done = [t for t in times if t is not None]
            medians.append(round(statistics.median(done), 3) if done else None)
            all_rounds.append([None if t is None else round(t, 3) for t in times])
            failed.append(len(times) - len(done))
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in reversed(dhts):
            dht.shutdown()
    return {
        "peers": group_sizes,
        "rounds": rounds,
        "median_round_s": medians,  # over the rounds that succeeded
        "rounds_s": all_rounds,  # null: a round that failed
        "failed_rounds": failed,
    }


def timed_rounds(group, inputs, rounds: int, timeout: float) -> list[float | None]:
    """Seconds of each of `rounds` rounds in which every member of `group` averages its `inputs` at once:
    the slowest member's call (the round is over for the group when it is over for every member), or
    None for a round that failed for any member (GroupAverager never raises on a failed round)."""
    from concurrent.futures import ThreadPoolExecutor

    size = len(group)

    def one(member: int, key: int) -> tuple[bool, float]:
        started = time.perf_counter()
        outcome = group[member].average(inputs[member], 1.0, size, timeout, key)
        return outcome.ok and outcome.group_size == size, time.perf_counter() - started

    times = []
    with ThreadPoolExecutor(size) as pool:
        for key in range(rounds):
            outcomes = list(pool.map(one, range(size), [key] * size))
            ok = all(ok for ok, _ in outcomes)
            times.append(max(seconds for _, seconds in outcomes) if ok else None)
    return times


def wait_until_connected(dhts, timeout: float = 30.0) -> None:
    """Every DHT peer reads a record stored by every other (new hivemind DHTs may not see each other yet)."""
    tag = uuid.uuid4().hex[:8]
    for i, dht in enumerate(dhts):
        dht.store(f"probe_{tag}_{i}", i, expiration_time=time.time() + 60)
    deadline = time.monotonic() + timeout
    for reader in dhts:
        for i in range(len(dhts)):
            while reader.get(f"probe_{tag}_{i}", latest=True) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError("the averaging benchmark's DHT peers do not see each other")
                time.sleep(0.2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps before measuring")
    parser.add_argument("--hidden", type=int, default=256, help="the tiny Llama's hidden size")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--microbatch", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="target batch size (samples per step)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--matchmaking-time", type=float, default=1.0)
    parser.add_argument("--averaging-timeout", type=float, default=10.0)
    parser.add_argument(
        "--configs",
        type=parse_config,
        nargs="+",
        default=[parse_config(c) for c in CONFIGS],
        help="PEERSxTRAINERS: peers per stage and trainers (default: 1x1 2x1 2x2)",
    )
    parser.add_argument("--concurrency", type=int, default=None, help="microbatches in flight per trainer")
    parser.add_argument("--averaging-peers", type=int, nargs="*", default=[2, 3])
    parser.add_argument("--rounds", type=int, default=5, help="timed averaging rounds per group size")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for one configuration")
    parser.add_argument("--quick", action="store_true", help="3 steps, hidden 128, 3 averaging rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.hidden, args.rounds = min(args.steps, 3), min(args.hidden, 128), min(args.rounds, 3)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")
    run_until_sigterm(measure, args)


def measure(args) -> None:
    """Print the JSON lines: one per configuration, then the averaging rounds'."""
    from swarm.models.tokenizer import load_tokenizer
    from swarm.training.data import TextSequences
    from swarm.training.run import load_run, make_run, write_run

    with tempfile.TemporaryDirectory(prefix="swarm-bench-training-") as folder:
        model_path = write_model(Path(folder), args)
        run_file = Path(folder) / "run.toml"
        write_run(
            make_run(
                "bench_training",
                str(model_path),
                args.stages,
                lr=args.lr,
                target_batch_size=args.batch,
                microbatch_size=args.microbatch,
                seq_len=args.seq_len,
                matchmaking_time=args.matchmaking_time,
                averaging_timeout=args.averaging_timeout,
                clip_grad_norm=1.0,
            ),
            run_file,
        )
        run = load_run(run_file)
        config = run.config
        data = TextSequences(CORPUS, load_tokenizer(model_path), config.batch.seq_len)

        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        start, end = config.stages[0]
        stage_params = [p.detach() for block in model.model.layers[start:end] for p in block.parameters()]
        num_params = sum(p.numel() for p in model.parameters())
        del model
        common = {
            "model": f"tiny-llama h{args.hidden} x{args.blocks} blocks v256 ({num_params / 1e6:.2f}M params)",
            "device": "cpu",
            "device_name": device_name("cpu"),
            "stages": config.num_stages,
            "steps": args.steps,
            "batch": config.batch.target_batch_size,
            "microbatch": config.batch.microbatch_size,
            "seq_len": config.batch.seq_len,
        }
        for peers, trainers in args.configs:
            # local training right before and right after the swarm's run, so that both see about the same
            # load on the machine; its rate is over both
            before, local_loss = local_training(model_path, config, data, args.steps, args.warmup)
            row = run_configuration(run, peers, trainers, args)
            after, _ = local_training(model_path, config, data, args.steps, args.warmup)
            local_rate = 2 / (1 / before + 1 / after)  # the same samples twice: total samples / total time
            swarm_rate = row.pop("swarm_samples_per_s")
            final_loss = row.pop("final_loss")
            row = {
                "name": "training",
                **common,
                "peers_per_stage": peers,
                "trainers": trainers,
                "trainers_in": "threads",
                "swarm_samples_per_s": swarm_rate,
                "local_samples_per_s": round(local_rate, 2),
                "local_samples_per_s_before_after": [round(before, 2), round(after, 2)],
                "ratio": round(swarm_rate / local_rate, 3),
                "final_loss": final_loss,
                "local_final_loss": round(local_loss, 4),
                **row,
            }
            print(json.dumps(row), flush=True)
        if args.averaging_peers:
            numel = sum(p.numel() for p in stage_params)
            templates = [torch.zeros_like(p) for p in stage_params]
            result = averaging_round(templates, args.averaging_peers, args.rounds, args)
            row = {
                "name": "averaging_round",
                **common,
                "peers_per_stage": result.pop("peers"),
                "trainers": 0,
                "tensors": len(templates),
                "numel": numel,
                "megabytes": round(numel * 4 / 2**20, 2),
                **result,
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
