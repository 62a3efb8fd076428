"""What refereed verification (Verde) costs, measured in one run on one local swarm of real node processes.

1. Greedy generation with client spot checks at verify_rate 0 (no checker at all), 0.1 and 1.0, where each of
   2 spans has two honest deterministic nodes: ms per token, the ratio to verify_rate 0 (goal: <= 1.1x at
   0.1), the checks and their outcomes; nobody may be convicted and the text must be the same at every rate.
2. The deterministic profile against `swarm node --no-deterministic`: the same generation, ms per token.
3. One dispute, refereed by this client over RPC, between an honest node and one that lies by one ulp in one
   operator (`--fault perturb:block=K,op=down_proj`): rounds, bytes, seconds, the convicted block and op;
   then the same cheater caught during generation at verify_rate 1.0.

The runs of parts 1 and 2 alternate (one token sequence per client in turn; the first round warms up), so
load from other processes affects every variant alike. Prints one JSON object per line; exits 1 after the
last row when an honest node was convicted, the text differed between rates, or a cheater went free.

    python -m benchmarks.verification --model smollm2-135m-instruct --new-tokens 16 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
import uuid
from collections import Counter

import torch

from benchmarks.common import device_name, random_token_ids, run_until_sigterm
from swarm.utils.timing import percentile

RATES = (0.0, 0.1, 1.0)
GOAL_RATIO = 1.1  # at verify_rate 0.1, on the honest path
PERTURBED_OP = "down_proj"
SEED = 0
TIMEOUT = 120.0  # seconds per RPC: a commit recomputes a whole span with every operator traced


def ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


def latency_fields(gaps: list[float]) -> dict:
    return {
        "ms_per_token_median": ms(statistics.median(gaps)),
        "ms_per_token_p90": ms(percentile(gaps, 0.9)),
        "ms_per_token_mean": ms(statistics.fmean(gaps)),
    }


def generate_once(model, input_ids: torch.Tensor, new_tokens: int):
    """Greedy generation in its own session: (token ids, decode gaps in seconds, the session).

    No streamer: with one, generate() must wait for each spot check before showing the next token, while
    without one the checks run beside the next steps. A gap is the time between two steps reaching the
    last block; the last gap ends when generate() returns, so it holds the wait for checks still running."""
    step_times: list[float] = []
    with model.inference_session(max_length=input_ids.shape[1] + new_tokens) as session:
        session.on_step = lambda _position: step_times.append(time.perf_counter())
        output = model.generate(
            input_ids,
            max_new_tokens=new_tokens,
            do_sample=False,
            session=session,
            eos_token_id=[],
        )
    step_times.append(time.perf_counter())
    gaps = [b - a for a, b in zip(step_times[:-1], step_times[1:], strict=True)]
    return output, gaps, session


def start_nodes(swarm, model: str, spans: list[str], block: int) -> dict[str, list]:
    """Two honest deterministic nodes and one --no-deterministic node per span, and a cheater on the last span
    (announcing far more throughput, so that routes through that span prefer it); all loaded in parallel."""
    swarm.start_bootstrap()
    honest = ("--dtype", "float32", "--device", "cpu", "--throughput", "1")
    started: dict[str, list] = {"honest": [], "nondeterministic": [], "cheater": []}
    for index, span in enumerate(spans):
        for copy in range(2):
            name = f"honest-{index}-{copy}"
            started["honest"].append(swarm.start_node(model, span, *honest, wait=False, name=name))
        name = f"nondet-{index}"
        process = swarm.start_node(model, span, *honest, "--no-deterministic", wait=False, name=name)
        started["nondeterministic"].append(process)
    fault = f"perturb:block={block},op={PERTURBED_OP}"
    cheater = ("--dtype", "float32", "--device", "cpu", "--throughput", "1000", "--fault", fault)
    started["cheater"].append(swarm.start_node(model, spans[-1], *cheater, wait=False, name="cheater"))
    for processes in started.values():
        for process in processes:
            swarm.wait_ready(process, timeout=600)
    return {kind: [p.peer_id for p in processes] for kind, processes in started.items()}


def measure_generation(args, peers, input_ids, base: dict, emit) -> tuple[list[str], tuple[int, ...]]:
    """Parts 1 and 2: four clients (verify_rate 0, 0.1, 1.0 on the deterministic nodes; verify_rate 0 on the
    --no-deterministic ones) take turns generating. Returns the problems found (empty when none) and the
    honest text's token ids."""
    from swarm.client import DistributedModelForCausalLM

    problems = []
    variants = {f"rate-{rate}": (rate, peers["honest"]) for rate in RATES}
    variants["nondeterministic"] = (0.0, peers["nondeterministic"])
    with contextlib.ExitStack() as stack:
        models = {}
        for key, (rate, allowed) in variants.items():
            models[key] = stack.enter_context(
                DistributedModelForCausalLM.from_pretrained(
                    args.model,
                    peers["bootstrap"],
                    verify_rate=rate,
                    allowed_servers=allowed,
                    request_timeout=TIMEOUT,
                )
            )
            if models[key].swarm.spot_checker is not None:
                models[key].swarm.spot_checker.rng = random.Random(SEED)
        gaps = {key: [] for key in variants}
        texts = {key: set() for key in variants}
        checks = {key: [] for key in variants}
        order = list(variants)
        for repeat in range(args.repeats + 1):  # round 0 warms up
            turn = order[repeat % len(order) :] + order[: repeat % len(order)]
            for key in turn:
                output, run_gaps, session = generate_once(models[key], input_ids, args.new_tokens)
                texts[key].add(tuple(output[0].tolist()))
                if repeat > 0:
                    gaps[key].extend(run_gaps)
                    checks[key].extend(session.spot_checks)
        convicted = {key: sorted(model.swarm.convicted) for key, model in models.items()}

    honest_text = texts["rate-0.0"]
    baseline = gaps["rate-0.0"]
    for rate in RATES:
        key = f"rate-{rate}"
        row_gaps = gaps[key]
        identical = texts[key] == honest_text and len(honest_text) == 1
        ratio = statistics.median(row_gaps) / statistics.median(baseline)
        ratio_mean = statistics.fmean(row_gaps) / statistics.fmean(baseline)
        row = {
            "name": "verification_generation",
            **base,
            "verify_rate": rate,
            "spans": len(peers["spans"]),
            "honest_nodes_per_span": 2,
            "new_tokens": args.new_tokens,
            "prompt_tokens": args.prompt_tokens,
            "repeats": args.repeats,
            **latency_fields(row_gaps),
            "ratio_to_rate_0": round(ratio, 3),
            "ratio_to_rate_0_mean": round(ratio_mean, 3),
            "spot_checks": len(checks[key]),
            "outcomes": dict(Counter(check.outcome for check in checks[key])),
            "convicted": convicted[key],
            "text_identical_across_rates": identical,
        }
        if rate == 0.1:
            # a check is a rare slow step: the median hides it, the mean carries it
            row["goal_ratio"] = GOAL_RATIO
            row["goal_met_median"] = ratio <= GOAL_RATIO
            row["goal_met_mean"] = ratio_mean <= GOAL_RATIO
        emit(row)
        if convicted[key]:
            problems.append(f"verify_rate {rate}: honest nodes convicted {convicted[key]}")
        if not identical:
            problems.append(f"verify_rate {rate}: the text differs from verify_rate 0's")
        if any(check.outcome != "agreed" for check in checks[key]):
            problems.append(f"verify_rate {rate}: honest checks did not all agree: {row['outcomes']}")

    deterministic, free = gaps["rate-0.0"], gaps["nondeterministic"]
    emit(
        {
            "name": "deterministic_profile",
            **base,
            "verify_rate": 0.0,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "deterministic_ms_per_token_median": ms(statistics.median(deterministic)),
            "deterministic_ms_per_token_p90": ms(percentile(deterministic, 0.9)),
            "nondeterministic_ms_per_token_median": ms(statistics.median(free)),
            "nondeterministic_ms_per_token_p90": ms(percentile(free, 0.9)),
            "ratio_deterministic_to_nondeterministic": round(
                statistics.median(deterministic) / statistics.median(free), 3
            ),
            "text_identical": texts["nondeterministic"] == honest_text,
        }
    )
    return problems, next(iter(honest_text))


def measure_dispute(args, checkpoint, peers, block: int, span: tuple[int, int], base, emit) -> list[str]:
    """Part 3a: commit the same forward on an honest node and on the cheater, and referee the dispute."""
    from swarm.client import DistributedModelForCausalLM
    from swarm.models.span import load_span
    from swarm.verification.determinism import deterministic_profile
    from swarm.verification.remote import remote_commit, run_remote_dispute

    honest = peers["honest"][-1]  # serves the last span, as the cheater does
    cheater = peers["cheater"][0]
    start, end = span
    generator = torch.Generator().manual_seed(SEED)
    hidden = torch.randn(1, args.prompt_tokens, checkpoint.config.hidden_size, generator=generator)
    with DistributedModelForCausalLM.from_pretrained(args.model, peers["bootstrap"]) as model:
        p2p, request_id = model.p2p, uuid.uuid4().hex
        started = time.perf_counter()
        (a, _), (b, _) = (
            model.run_async(remote_commit(p2p, peer, request_id, start, end, hidden, None, None, TIMEOUT))
            for peer in (honest, cheater)
        )
        committed = time.perf_counter()
        referee = load_span(checkpoint, start, end, dtype=torch.float32)
        loaded = time.perf_counter()
        with deterministic_profile():
            verdict, parties = model.run_async(
                run_remote_dispute(p2p, honest, cheater, referee, a, b, request_id, None, None, TIMEOUT)
            )
        finished = time.perf_counter()
    names = {"a": honest, "b": cheater}
    convicted_block = None if verdict.block is None else verdict.first_block + verdict.block
    row = {
        "name": "verification_dispute",
        **base,
        "span": [start, end],
        "prompt_tokens": args.prompt_tokens,
        "leaves": a.num_leaves,
        "rounds": verdict.rounds,
        "bytes_moved": verdict.bytes_moved,
        "wire_bytes": {name: party.wire_bytes for name, party in parties.items()},
        "wire_bytes_total": sum(party.wire_bytes for party in parties.values()),
        "commit_s": round(committed - started, 3),
        "referee_load_s": round(loaded - committed, 3),
        "dispute_s": round(finished - loaded, 3),
        "seconds": round(finished - started, 3),
        "convicted": [names[loser] for loser in verdict.losers],
        "cheater_convicted": verdict.losers == ("b",),
        "reasons": verdict.reasons,
        "convicted_block": convicted_block,
        "convicted_op": verdict.op,
        "perturbed_block": block,
        "perturbed_op": PERTURBED_OP,
    }
    emit(row)
    if verdict.losers != ("b",) or (convicted_block, verdict.op) != (block, PERTURBED_OP):
        return [f"the dispute convicted {verdict.losers} at block {convicted_block}, {verdict.op}"]
    return []


def measure_generation_dispute(args, peers, input_ids, honest_text, block: int, base, emit) -> list[str]:
    """Part 3b: generation at verify_rate 1.0 where routes prefer the cheater."""
    from swarm.client import DistributedModelForCausalLM

    allowed = peers["honest"] + peers["cheater"]
    cheater = peers["cheater"][0]
    with DistributedModelForCausalLM.from_pretrained(
        args.model, peers["bootstrap"], verify_rate=1.0, allowed_servers=allowed, request_timeout=TIMEOUT
    ) as model:
        model.swarm.spot_checker.rng = random.Random(SEED)
        started = time.perf_counter()
        output, _, session = generate_once(model, input_ids, args.new_tokens)
        seconds = time.perf_counter() - started
        convicted = sorted(model.swarm.convicted)
    disputes = [check for check in session.spot_checks if check.outcome == "disputed"]
    verdict = disputes[0].verdict if disputes else None
    row = {
        "name": "verification_generation_dispute",
        **base,
        "verify_rate": 1.0,
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "cheater": cheater,
        "convicted": convicted,
        "cheater_convicted": convicted == [cheater],
        "disputes": len(disputes),
        "convicted_block": None if verdict is None else verdict.first_block + verdict.block,
        "convicted_op": None if verdict is None else verdict.op,
        "dispute_rounds": None if verdict is None else verdict.rounds,
        "dispute_bytes_moved": None if verdict is None else verdict.bytes_moved,
        "recoveries": session.num_recoveries,
        "text_equals_honest": tuple(output[0].tolist()) == honest_text,
        "seconds": round(seconds, 3),
        "perturbed_block": block,
        "perturbed_op": PERTURBED_OP,
    }
    emit(row)
    problems = []
    if convicted != [cheater]:
        problems.append(f"generation at verify_rate 1.0 convicted {convicted}, not the cheater {cheater}")
    if not row["text_equals_honest"]:
        problems.append("generation with the cheater caught returned other text than the honest one")
    return problems


def measure(args) -> list[str]:
    from swarm.local import LocalSwarm, split_blocks
    from swarm.models.checkpoint import resolve_checkpoint
    from swarm.node.config import parse_blocks

    checkpoint = resolve_checkpoint(args.model)
    spans = split_blocks(checkpoint.num_blocks, 2)
    last = parse_blocks(spans[-1])
    block = args.perturbed_block if args.perturbed_block is not None else (last[0] + last[1]) // 2
    if not last[0] <= block < last[1]:
        raise SystemExit(f"--perturbed-block must be within the last span [{last[0]}, {last[1]})")
    input_ids = random_token_ids(checkpoint, 1, args.prompt_tokens)
    base = {
        "model": checkpoint.name,
        "device": "cpu",
        "dtype": "float32",
        "device_name": device_name("cpu"),
    }

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)

    with LocalSwarm() as swarm:
        peers = start_nodes(swarm, args.model, spans, block)
        peers["bootstrap"], peers["spans"] = swarm.initial_peers, spans
        problems, honest_text = measure_generation(args, peers, input_ids, base, emit)
        problems += measure_dispute(args, checkpoint, peers, block, last, base, emit)
        problems += measure_generation_dispute(args, peers, input_ids, honest_text, block, base, emit)
    return problems


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or HF folder")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 16 (--quick: 4)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default: 16 (--quick: 8)")
    parser.add_argument("--repeats", type=int, default=None, help="measured rounds; default: 2 (--quick: 1)")
    parser.add_argument(
        "--perturbed-block", type=int, default=None, help="the cheater's block (default: mid last span)"
    )
    parser.add_argument("--quick", action="store_true", help="the smallest sizes")
    args = parser.parse_args(argv)
    defaults = {"new_tokens": 4, "prompt_tokens": 8, "repeats": 1} if args.quick else {}
    for name, value in {"new_tokens": 16, "prompt_tokens": 16, "repeats": 2, **defaults}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.new_tokens < 2 or args.repeats < 1:
        parser.error("--new-tokens must be >= 2 (a gap needs two tokens) and --repeats >= 1")
    problems = run_until_sigterm(measure, args)
    for problem in problems:
        print(f"verification benchmark: {problem}", file=sys.stderr)
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
