"""Prompt-tuning step time: forward + backward through a local swarm of 3 nodes against local autograd
on the same weights, in one run. Prints one JSON object.

    python -m benchmarks.finetune --model smollm2-135m-instruct --batch 8 --seq 32 --steps 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--pre-seq-len", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from swarm.client import DistributedModelForCausalLM
    from swarm.local import LocalSwarm, split_blocks
    from swarm.models.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.model)
    vocab = checkpoint.config.vocab_size
    input_ids = torch.randint(10, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(10, vocab, (args.batch,), generator=torch.Generator().manual_seed(1))

    def timed_steps(logits_fn, params):
        optimizer = torch.optim.Adam(params, lr=1e-3)
        times = []
        for _ in range(args.steps + 1):  # the first step warms up
            started = time.perf_counter()
            loss = F.cross_entropy(logits_fn(input_ids)[:, -1], targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - started)
        return statistics.median(times[1:])

    local = (
        AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32)
        .eval()
        .requires_grad_(False)
    )
    prompts = torch.nn.Parameter(torch.randn(args.pre_seq_len, checkpoint.config.hidden_size) * 0.02)

    def local_logits(ids):
        embeds = local.model.embed_tokens(ids)
        inputs = torch.cat([prompts.unsqueeze(0).expand(ids.shape[0], -1, -1), embeds], dim=1)
        return local(inputs_embeds=inputs).logits[:, args.pre_seq_len :]

    local_step = timed_steps(local_logits, [prompts])
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.start_nodes(args.model, split_blocks(checkpoint.num_blocks, args.nodes))
        with DistributedModelForCausalLM.from_pretrained(
            args.model, swarm.initial_peers, tuning_mode="ptune", pre_seq_len=args.pre_seq_len
        ) as model:
            swarm_step = timed_steps(lambda ids: model(ids).logits, [model.prompt_embeddings.weight])
    print(
        json.dumps(
            {
                "name": "finetune_step",
                "model": checkpoint.name,
                "device": "cpu",
                "dtype": "float32",
                "nodes": args.nodes,
                "batch": args.batch,
                "seq": args.seq,
                "pre_seq_len": args.pre_seq_len,
                "local_step_s": round(local_step, 3),
                "swarm_step_s": round(swarm_step, 3),
                "ratio": round(local_step / swarm_step, 3),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
