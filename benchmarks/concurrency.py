"""Aggregate tokens/s of N concurrent clients on one node against 1 client, in one run.

One node serves the whole model; each client is a thread with its own prompt and its own inference session
(greedy, a fixed number of new tokens). Aggregate tokens/s = all clients' new tokens / the wall time from
the first start to the last finish (prefill included). With `--batching off on`, nodes without and with
`--batch-decode` serve side by side (one swarm each) and are measured in alternating rounds, so before and
after come from the same run under the same load. Every client's tokens are checked against what the same
prompt gives alone on the first node (`tokens_match`). A last row times the node's compute alone, in this
process: N sessions' decode steps one by one against one batched call. Prints one JSON object per line.

The clients share this machine with the node, so whole clients (`--client generate`) also measure their
own cost: each one's head reads its full weights for every token (SmolLM2: 113 MB), which a node's batch
does once for all. `--client steps` sends only the decode steps a node serves (a prompt token's embedding
each), which is the node's side of N clients on machines of their own.

    python -m benchmarks.concurrency --model tiny --clients 1 8 --new-tokens 32 --batching off on
    python -m benchmarks.concurrency --model smollm2-135m-instruct --client steps
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import statistics
import tempfile
import threading
import time

import torch

from benchmarks.common import device_name, random_token_ids, torch_threads
from benchmarks.inference import add_client_threads_argument


def _model_path(model: str, workdir: str) -> str:
    """ "tiny" writes a tiny random Llama into `workdir`; anything else is a catalog name or a path."""
    if model != "tiny":
        return model
    from swarm.models.tiny import write_tiny_llama

    return str(write_tiny_llama(f"{workdir}/tiny", num_blocks=6))


def _generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """A whole client: greedy generate(), embeddings and head on this machine; its new tokens."""
    sequence = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])
    return sequence[0, prompt.shape[1] :]


@torch.inference_mode()
def _steps(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """What a node serves for one client, without the client's own compute: the prompt's step, then one
    decode step per new token (each the embedding of a prompt token, round robin); the last outputs."""
    embeds = model.get_input_embeddings()(prompt)
    outputs = []
    with model.inference_session(max_length=prompt.shape[1] + new_tokens) as session:
        session.step(embeds)
        for i in range(new_tokens):
            k = i % prompt.shape[1]
            outputs.append(session.step(embeds[:, k : k + 1])[:, -1])
    return torch.cat(outputs)


CLIENTS = {"generate": _generate, "steps": _steps}


def _same(output: torch.Tensor, reference: torch.Tensor) -> bool:
    """Tokens equal; hidden states equal up to batched decode's float rounding (it is not bit-exact)."""
    if output.dtype.is_floating_point:
        return torch.allclose(output, reference, rtol=1e-3, atol=1e-4)
    return torch.equal(output, reference)


def _generate_all(
    model, prompts: list[torch.Tensor], new_tokens: int, kind: str = "generate"
) -> tuple[float, list[torch.Tensor]]:
    """Each prompt run by its own client thread at once (`kind`: a CLIENTS entry): (wall seconds, each
    one's outputs)."""
    outputs: list[torch.Tensor | None] = [None] * len(prompts)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts) + 1)

    def client(index: int) -> None:
        try:
            barrier.wait(60)
            outputs[index] = CLIENTS[kind](model, prompts[index], new_tokens)
        except BaseException as e:  # reported after every thread is joined
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    barrier.wait(60)
    started = time.perf_counter()
    for thread in threads:
        thread.join(600)
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed, outputs


def measure(models: dict, prompts, clients: list[int], new_tokens: int, repeats: int, kind: str = "generate"):
    """{(mode, n): [aggregate tokens/s per round]} for each mode's client model, and whether every client's
    tokens equal its prompt's alone (on the first mode's node). Rounds alternate modes and client counts,
    so that the shared machine's load drifts hit all of them alike."""
    first = next(iter(models.values()))
    alone = [_generate_all(first, [prompt], new_tokens, kind)[1][0] for prompt in prompts]
    for model in list(models.values())[1:]:
        _generate_all(model, prompts[:1], new_tokens, kind)  # warm-up
    rates: dict[tuple[str, int], list[float]] = {(mode, n): [] for mode in models for n in clients}
    match = True
    for _ in range(repeats):
        for n in clients:
            for mode, model in models.items():
                elapsed, outputs = _generate_all(model, prompts[:n], new_tokens, kind)
                rates[mode, n].append(n * new_tokens / elapsed)
                match &= all(_same(out, ref) for out, ref in zip(outputs, alone, strict=False))
    return rates, match


@torch.inference_mode()
def node_compute(checkpoint, sessions: int, steps: int, prompt_tokens: int) -> dict:
    """The node's compute alone, in this process with the node's one thread: `sessions` decode steps one
    by one against the same steps as one batched call (decode_sessions), each session with its own cache
    of its own length; milliseconds per token, median over `steps` rounds."""
    from swarm.models.span import load_span
    from swarm.node.batched_decode import decode_sessions
    from swarm.node.kv_cache import SpanCache

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a deterministic CPU node computes
    try:
        span = load_span(checkpoint, 0, checkpoint.num_blocks)
        layers, hidden_size = slice(0, checkpoint.num_blocks), checkpoint.config.hidden_size

        def prefilled() -> list[SpanCache]:
            caches = []
            for i in range(sessions):
                cache = SpanCache(0, checkpoint.num_blocks, prompt_tokens + sessions + steps + 1)
                span(torch.randn(1, prompt_tokens + i, hidden_size), cache=cache)
                caches.append(cache)
            return caches

        alone, batched = prefilled(), prefilled()
        one_by_one, together = [], []
        for _ in range(steps):
            hidden = torch.randn(sessions, 1, hidden_size)
            started = time.perf_counter()
            for i, cache in enumerate(alone):
                span(hidden[i : i + 1], cache=cache)
            one_by_one.append((time.perf_counter() - started) / sessions)
            positions = torch.tensor([[cache.get_seq_length()] for cache in batched])
            started = time.perf_counter()
            decode_sessions(span, hidden, positions, batched, layers)
            together.append((time.perf_counter() - started) / sessions)
    finally:
        torch.set_num_threads(threads)
    alone_ms, batched_ms = 1000 * statistics.median(one_by_one), 1000 * statistics.median(together)
    return {
        "name": "concurrency_node_compute",
        "model": checkpoint.name,
        "sessions": sessions,
        "alone_ms_per_token": round(alone_ms, 2),
        "batched_ms_per_token": round(batched_ms, 2),
        "ratio": round(alone_ms / batched_ms, 3),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help='a catalog name, a path, or "tiny"')
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batching", choices=["off", "on"], nargs="+", default=["off", "on"])
    parser.add_argument("--batch-limit", type=int, default=8, help="the batching node's --batch-decode")
    parser.add_argument("--node-args", default="", help='more flags for both nodes, e.g. "--num-threads 2 "')
    parser.add_argument(
        "--client",
        choices=sorted(CLIENTS),
        default="generate",
        help="generate: whole clients (embeddings, head, greedy loop) on this machine, competing with the "
        "node for its cores; steps: only the decode steps a node serves, each a prompt token's embedding",
    )
    add_client_threads_argument(parser)
    args = parser.parse_args(argv)

    from swarm.client import DistributedModelForCausalLM
    from swarm.local import LocalSwarm
    from swarm.models.checkpoint import resolve_checkpoint
    from swarm.utils.tensors import FLOAT_DTYPES

    dtype = FLOAT_DTYPES[args.dtype]
    with tempfile.TemporaryDirectory(prefix="swarm-concurrency-") as workdir:
        model = _model_path(args.model, workdir)
        checkpoint = resolve_checkpoint(model)
        prompts = [
            random_token_ids(checkpoint, max(args.clients), args.prompt_tokens)[i : i + 1]
            for i in range(max(args.clients))
        ]
        with contextlib.ExitStack() as stack:
            models = {}
            for batching in args.batching:  # one node per mode, side by side, measured in turns
                swarm = stack.enter_context(LocalSwarm())
                swarm.start_bootstrap()
                flags = ["--batch-decode", str(args.batch_limit)] if batching == "on" else []
                blocks = f"0:{checkpoint.num_blocks}"
                swarm.start_node(model, blocks, "--dtype", args.dtype, *flags, *shlex.split(args.node_args))
                models[batching] = stack.enter_context(
                    DistributedModelForCausalLM.from_pretrained(model, swarm.initial_peers, dtype=dtype)
                )
            with torch_threads(args.client_threads or None):
                rates, match = measure(
                    models, prompts, args.clients, args.new_tokens, args.repeats, args.client
                )
        medians = {key: statistics.median(values) for key, values in rates.items()}
        for batching in args.batching:
            for n in args.clients:
                median = medians[batching, n]
                row = {
                    "name": "concurrency",
                    "model": checkpoint.name,
                    "device": "cpu",
                    "dtype": args.dtype,
                    "device_name": device_name("cpu"),
                    "batching": batching,
                    "batch_limit": args.batch_limit if batching == "on" else 1,
                    "node_args": args.node_args,
                    "client": args.client,
                    "client_torch_threads": args.client_threads or torch.get_num_threads(),
                    "clients": n,
                    "new_tokens": args.new_tokens,
                    "aggregate_tokens_per_s": round(median, 2),
                    "runs_tokens_per_s": [round(r, 2) for r in rates[batching, n]],
                    "ratio_to_first": round(median / medians[batching, args.clients[0]], 3),
                    "tokens_match": match,
                }
                print(json.dumps(row), flush=True)
        print(json.dumps(node_compute(checkpoint, max(args.clients), 8, args.prompt_tokens)), flush=True)
    first, last = min(args.clients), max(args.clients)
    if ("off", first) in medians and ("on", last) in medians:  # the goal: batched N against unbatched 1
        summary = {
            "name": "concurrency_gain",
            "model": checkpoint.name,
            "client": args.client,
            "clients": last,
            "batched_vs_one_unbatched": round(medians["on", last] / medians["off", first], 3),
            "unbatched_vs_one_unbatched": round(medians["off", last] / medians["off", first], 3),
            "batched_vs_unbatched": round(medians["on", last] / medians["off", last], 3),
            "one_client_batched_vs_unbatched": round(medians["on", first] / medians["off", first], 3),
        }
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
