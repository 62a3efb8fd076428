"""The OpenAI-compatible API's overhead per token, and its aggregate throughput: the same greedy generation
through `swarm api` (the official openai client reading a stream) and through the Python client, on the
same local swarm, in turns; then 1 and `--concurrent` simultaneous streams through the API.

Per-token latency is the time between consecutive streamed tokens as each client sees them (the prefill is
left out); the API's overhead is the difference of the medians. The API streams with `logprobs: 0` so that
every token is a chunk (text alone can be held back while a character is incomplete); both paths produce
the same tokens (checked on every run).

    python -m benchmarks.openai_api --model smollm2-135m-instruct --nodes 2 --new-tokens 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import device_name, random_token_ids, run_until_sigterm, start_split_swarm
from swarm.utils.timing import TokenTimer, percentile


def api_run(client, model: str, ids: list[int], new_tokens: int) -> tuple[list[str], list[float]]:
    """(token strings, gaps between consecutive token chunks in seconds) of one streamed completion."""
    stream = client.completions.create(
        model=model, prompt=ids, max_tokens=new_tokens, temperature=0, logprobs=0, stream=True
    )
    tokens, times = [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            times.append(time.perf_counter())
            tokens.extend(chunk.choices[0].logprobs.tokens)
    return tokens, [b - a for a, b in zip(times, times[1:], strict=False)]


def aggregate_tokens_per_s(client, model: str, prompts: list[list[int]], new_tokens: int) -> float:
    """Tokens per second over every stream, for len(prompts) streams at once."""

    def run(ids: list[int]) -> int:
        reply = client.completions.create(model=model, prompt=ids, max_tokens=new_tokens, temperature=0)
        return reply.usage.completion_tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        total = sum(pool.map(run, prompts))
    return total / (time.perf_counter() - started)


def measure(args) -> dict:
    import openai

    from swarm.client import DistributedModelForCausalLM
    from swarm.local import LocalSwarm
    from swarm.models import load_tokenizer
    from swarm.models.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.model)
    tokenizer = load_tokenizer(args.model)
    input_ids = random_token_ids(checkpoint, 1, args.prompt_tokens)
    ids = input_ids[0].tolist()
    prompts = random_token_ids(checkpoint, args.concurrent + 1, args.prompt_tokens).tolist()
    python_gaps, api_gaps = [], []
    with LocalSwarm() as swarm:
        start_split_swarm(swarm, args.model, checkpoint.num_blocks, args.nodes, "cpu", "float32")
        api = swarm.start_api([args.model], "--max-tokens", str(args.new_tokens))
        with (
            DistributedModelForCausalLM.from_pretrained(args.model, swarm.initial_peers) as model,
            openai.OpenAI(base_url=api.address, api_key="none", max_retries=0, timeout=600) as client,
        ):
            name = model.swarm.model_name
            for repeat in range(args.repeats + 1):  # the first of each warms up
                timer = TokenTimer()
                out = model.generate(
                    input_ids, max_new_tokens=args.new_tokens, streamer=timer, eos_token_id=[]
                )
                expected = [tokenizer.decode([t]) for t in out[0, len(ids) :].tolist()]
                tokens, gaps = api_run(client, name, ids, args.new_tokens)
                if tokens != expected[: len(tokens)] or not tokens:
                    raise SystemExit(
                        f"the API's tokens differ from the Python client's: {tokens} vs {expected}"
                    )
                if repeat:
                    python_gaps += timer.gaps()
                    api_gaps += gaps
            single = aggregate_tokens_per_s(client, name, prompts[:1], args.new_tokens)
            concurrent = aggregate_tokens_per_s(client, name, prompts[1:], args.new_tokens)
    if not api_gaps:
        raise SystemExit("the API streamed fewer than 2 tokens per run (an early end of sequence)")
    python_ms, api_ms = (1000 * statistics.median(g) for g in (python_gaps, api_gaps))
    return {
        "name": "openai_api",
        "model": checkpoint.name,
        "nodes": args.nodes,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "python_ms_per_token": round(python_ms, 2),
        "api_ms_per_token": round(api_ms, 2),
        "api_p90_ms": round(1000 * percentile(api_gaps, 90), 2),
        "overhead_ms_per_token": round(api_ms - python_ms, 2),
        "ratio": round(api_ms / python_ms, 3),
        "tokens_per_s_1_stream": round(single, 2),
        f"tokens_per_s_{args.concurrent}_streams": round(concurrent, 2),
        "device": "cpu",
        "device_name": device_name("cpu"),
        "notes": [
            "the API runs generate() through its own swarm client on a worker thread and streams server-sent "
            "events to the openai client in this process; the Python client generates in this process",
            "runs alternate (Python client, then API) on the same swarm; medians over all gaps after a "
            "warm-up run of each; the aggregate figures are non-streamed completions at once",
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
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--output", type=Path, default=None, help="also append the JSON line to this file")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.new_tokens < 3 or args.repeats < 1 or args.concurrent < 1:
        parser.error("--nodes, --repeats and --concurrent must be >= 1, --new-tokens >= 3")
    row = run_until_sigterm(measure, args)
    line = json.dumps(row)
    print(line, flush=True)
    if args.output is not None:
        with args.output.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
