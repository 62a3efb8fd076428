"""Prompt-tune the built-in SmolLM2 through a swarm to label short reviews as positive or negative.

The swarm's blocks stay frozen; only a few prompt vectors on this machine are trained. Without
--initial-peers the script starts a local swarm of 3 nodes itself.

It ends by generating with the trained prompts (they go into the nodes' KV caches), and with
--save writes them to a file that `from_pretrained(..., prompts=PATH)` loads:

    python examples/finetune_prompt.py --steps 20 --save sentiment.safetensors
    python examples/finetune_prompt.py --initial-peers /ip4/.../p2p/Qm... --mode deep_ptune
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DATA = Path(__file__).parent / "data" / "sentiment.jsonl"
INIT_TEXT = "Is the following review positive or negative?"


def load_examples(tokenizer) -> list[tuple[list[int], int]]:
    """(prompt token ids, label token id) pairs; the label is the first token of " positive"/" negative"."""
    examples = []
    for line in DATA.read_text().splitlines():
        item = json.loads(line)
        prompt = tokenizer(f"Review: {item['text']}\nSentiment:", add_special_tokens=False)["input_ids"]
        label = tokenizer(f" {item['label']}", add_special_tokens=False)["input_ids"][0]
        examples.append((prompt, label))
    return examples


def batch_of(examples, pad_id: int):
    """Left-padded batch: the last position of every row is where the label is predicted."""
    length = max(len(prompt) for prompt, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, (prompt, _) in enumerate(examples):
        input_ids[row, length - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, length - len(prompt) :] = 1
    labels = torch.tensor([label for _, label in examples])
    return input_ids, attention_mask, labels


def evaluate(model, examples, pad_id, choices) -> tuple[float, float]:
    """(loss over the whole vocabulary, accuracy between the two labels) on held-out examples."""
    with torch.no_grad():
        input_ids, mask, labels = batch_of(examples, pad_id)
        logits = model(input_ids, attention_mask=mask).logits[:, -1]
        predicted = torch.tensor(choices)[logits[:, choices].argmax(-1)]
    return F.cross_entropy(logits, labels).item(), (predicted == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--initial-peers", nargs="*", default=None)
    parser.add_argument("--mode", choices=["ptune", "deep_ptune"], default="ptune")
    parser.add_argument("--pre-seq-len", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--save", default=None, help="write the trained prompts to this safetensors file")
    args = parser.parse_args()

    from swarm.client import DistributedModelForCausalLM
    from swarm.local import LocalSwarm, split_blocks
    from swarm.models import load_tokenizer
    from swarm.models.checkpoint import resolve_checkpoint

    tokenizer = load_tokenizer(args.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = load_examples(tokenizer)
    random.Random(0).shuffle(examples)
    train, test = examples[:24], examples[24:]
    choices = sorted({label for _, label in examples})

    with contextlib.ExitStack() as stack:
        peers = args.initial_peers
        if not peers:
            swarm = stack.enter_context(LocalSwarm())
            swarm.start_bootstrap()
            swarm.start_nodes(args.model, split_blocks(resolve_checkpoint(args.model).num_blocks, 3))
            peers = swarm.initial_peers
        torch.manual_seed(0)
        model = stack.enter_context(
            DistributedModelForCausalLM.from_pretrained(
                args.model, peers, tuning_mode=args.mode, pre_seq_len=args.pre_seq_len
            )
        )
        # start the prompt from the embeddings of a task description, a common and stable initialisation
        hint = tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"]
        hint = (hint * args.pre_seq_len)[: args.pre_seq_len]
        with torch.no_grad():
            model.prompt_embeddings.weight.copy_(model.head.embed(torch.tensor(hint)))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=args.lr)
        print(
            f"training {sum(p.numel() for p in trainable)} prompt parameters ({args.mode}) through the swarm"
        )
        loss, acc = evaluate(model, test, pad_id, choices)
        print(f"held-out before: loss {loss:.4f}, accuracy {acc:.2f}")
        rng = random.Random(1)
        for step in range(args.steps):
            started = time.perf_counter()
            input_ids, mask, labels = batch_of(rng.sample(train, args.batch_size), pad_id)
            loss = F.cross_entropy(model(input_ids, attention_mask=mask).logits[:, -1], labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            print(
                f"step {step:3d}  loss {loss.item():.4f}  ({time.perf_counter() - started:.2f} s)", flush=True
            )
        loss, acc = evaluate(model, test, pad_id, choices)
        print(f"held-out after:  loss {loss:.4f}, accuracy {acc:.2f}")
        if args.save:
            model.save_prompts(args.save)
            print(f"prompts saved to {args.save}")
        # generation with what was trained: the prompts go in front of the review in the nodes' caches
        for prompt, label in test[:3]:
            output = model.generate(torch.tensor([prompt]), max_new_tokens=2)
            answer = tokenizer.decode(output[0, len(prompt) :]).strip()
            review = tokenizer.decode(prompt).replace("\n", " ")
            print(f"{review[-60:]!r} -> {answer!r} (labelled {tokenizer.decode([label]).strip()!r})")


if __name__ == "__main__":
    main()
