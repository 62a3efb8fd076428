"""The gRPC gateway's overhead per token: the same greedy generation through `swarm gateway` (a gRPC client
reading its stream) and through the Python client, on the same local swarm, in turns.

Per-token latency is the time between consecutive new tokens as each client sees them (the prefill is
left out); the gateway's overhead is the difference of the medians. Both paths produce the same tokens
(checked on every run).

    python -m benchmarks.gateway --model smollm2-135m-instruct --nodes 2 --new-tokens 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.common import device_name, random_token_ids, run_until_sigterm, start_split_swarm
from swarm.utils.timing import TokenTimer, percentile


def gateway_run(stub, ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """(tokens, gaps between consecutive token messages in seconds) of one streamed Generate call."""
    from swarm.proto import gateway_pb2

    request = gateway_pb2.GenerateRequest(input_ids=ids, max_new_tokens=new_tokens)
    tokens, times = [], []
    for message in stub.Generate(request, timeout=600):
        if message.token_ids:
            times.append(time.perf_counter())
            tokens.extend(message.token_ids)
    return tokens, [b - a for a, b in zip(times, times[1:], strict=False)]


def measure(args) -> dict:
    import grpc

    from swarm.client import DistributedModelForCausalLM
    from swarm.local import LocalSwarm
    from swarm.models.checkpoint import resolve_checkpoint
    from swarm.proto import gateway_pb2_grpc

    checkpoint = resolve_checkpoint(args.model)
    input_ids = random_token_ids(checkpoint, 1, args.prompt_tokens)
    ids = input_ids[0].tolist()
    python_gaps, gateway_gaps = [], []
    with LocalSwarm() as swarm:
        start_split_swarm(swarm, args.model, checkpoint.num_blocks, args.nodes, "cpu", "float32")
        gateway = swarm.start_gateway(args.model, "--max-new-tokens", str(args.new_tokens))
        with (
            DistributedModelForCausalLM.from_pretrained(args.model, swarm.initial_peers) as model,
            grpc.insecure_channel(gateway.address) as channel,
        ):
            stub = gateway_pb2_grpc.GatewayStub(channel)
            for repeat in range(args.repeats + 1):  # the first of each warms up
                timer = TokenTimer()
                out = model.generate(
                    input_ids, max_new_tokens=args.new_tokens, streamer=timer, eos_token_id=[]
                )
                expected = out[0, len(ids) :].tolist()
                tokens, gaps = gateway_run(stub, ids, args.new_tokens)
                if tokens != expected[: len(tokens)] or not tokens:
                    raise SystemExit(
                        f"the gateway's tokens differ from the Python client's: {tokens} vs {expected}"
                    )
                if repeat:
                    python_gaps += timer.gaps()
                    gateway_gaps += gaps
    if not gateway_gaps:
        raise SystemExit("the gateway streamed fewer than 2 tokens per run (an early end of sequence)")
    python_ms, gateway_ms = (1000 * statistics.median(g) for g in (python_gaps, gateway_gaps))
    return {
        "name": "gateway",
        "model": checkpoint.name,
        "nodes": args.nodes,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "python_ms_per_token": round(python_ms, 2),
        "gateway_ms_per_token": round(gateway_ms, 2),
        "gateway_p90_ms": round(1000 * percentile(gateway_gaps, 90), 2),
        "overhead_ms_per_token": round(gateway_ms - python_ms, 2),
        "ratio": round(gateway_ms / python_ms, 3),
        "device": "cpu",
        "device_name": device_name("cpu"),
        "notes": [
            "the gateway runs generate() through its own swarm client on a worker thread and streams each "
            "token over gRPC to a client in this process; the Python client generates in this process",
            "runs alternate (Python client, then gateway) on the same swarm; medians over all gaps after a "
            "warm-up run of each",
        ],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None, help="also append the JSON line to this file")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.new_tokens < 3 or args.repeats < 1:
        parser.error("--nodes and --repeats must be >= 1, --new-tokens >= 3")
    row = run_until_sigterm(measure, args)
    line = json.dumps(row)
    print(line, flush=True)
    if args.output is not None:
        with args.output.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
