"""Recovery time: a node serving the middle of the route is killed (SIGKILL, whole process group) during a
greedy generation; we report the time from its death to the next token, next to the usual per-token time.

    python -m benchmarks.recovery --model smollm2-135m-instruct --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks.common import random_token_ids
from swarm.utils.timing import TokenTimer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    from swarm.client import DistributedModelForCausalLM
    from swarm.local import LocalSwarm, split_blocks
    from swarm.models.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.model)
    spans = split_blocks(checkpoint.num_blocks, 3)
    input_ids = random_token_ids(checkpoint, 1, args.prompt_tokens)
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        primaries = swarm.start_nodes(args.model, spans, "--throughput", "100")
        swarm.start_nodes(args.model, spans, "--throughput", "10")  # backups, used only after a failure
        victim = primaries[1]
        with DistributedModelForCausalLM.from_pretrained(args.model, swarm.initial_peers) as model:
            kill_at = args.prompt_tokens + args.new_tokens // 2
            timer = TokenTimer()
            killed_at: list[float] = []

            def on_step(position):
                if position >= kill_at and not killed_at:
                    victim.kill()
                    killed_at.append(time.perf_counter())

            with model.inference_session(max_length=args.prompt_tokens + args.new_tokens) as session:
                session.on_step = on_step
                model.generate(
                    input_ids,
                    max_new_tokens=args.new_tokens,
                    session=session,
                    streamer=timer,
                    eos_token_id=[],
                )
                recoveries = session.num_recoveries
    gaps = timer.gaps()
    # the kill happens right after a step's last block, so the first token after it was already computed;
    # the one after that is the first whose step needed the replacement chain
    after_kill = sorted(t for t in timer.token_times if t > killed_at[0])[1]
    print(
        json.dumps(
            {
                "name": "recovery",
                "model": checkpoint.name,
                "device": "cpu",
                "nodes": 6,
                "recoveries": recoveries,
                "replayed_tokens": kill_at,
                "ms_per_token_median": round(1000 * statistics.median(gaps), 2),
                "death_to_next_token_ms": round(1000 * (after_kill - killed_at[0]), 2),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
