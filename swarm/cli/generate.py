"""`swarm generate` and `swarm chat`: text through the swarm. Answers go to stdout, logs to stderr."""

from __future__ import annotations

import argparse
import sys

from swarm.cli.common import add_cache_dir, add_initial_peers, add_prompts
from swarm.client.config import ClientConfig


def add_model_and_decoding(parser: argparse.ArgumentParser, default_max_new_tokens: int) -> None:
    parser.add_argument("--model", required=True, help="built-in name, HF checkpoint folder or .gguf file")
    parser.add_argument("--model-name", default=None, help="name in the DHT (default: as `swarm node`)")
    add_initial_peers(parser)
    parser.add_argument("--max-new-tokens", type=int, default=default_max_new_tokens)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    add_prompts(parser)
    parser.add_argument("--device", default="cpu", help="where the embeddings and LM head run: cpu, cuda")
    parser.add_argument(
        "--verify-rate",
        type=_rate,
        default=ClientConfig.verify_rate,
        help="fraction of span calls also run on a second node and compared; a node proven wrong is "
        "never used again (default: %(default)s)",
    )
    add_cache_dir(parser)


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {text}")
    return value


def add_parsers(subparsers) -> None:
    generate = subparsers.add_parser("generate", help="generate text through the swarm")
    add_model_and_decoding(generate, default_max_new_tokens=64)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.set_defaults(func=run_generate)

    chat = subparsers.add_parser("chat", help="multi-turn chat through the swarm")
    add_model_and_decoding(chat, default_max_new_tokens=256)
    chat.add_argument("--max-length", type=int, default=2048, help="tokens the whole conversation may take")
    chat.add_argument("--system", default=None, help="a system prompt")
    chat.set_defaults(func=run_chat)


def decoding_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )


def encode_prompt(tokenizer, prompt: str, chat: bool):
    """Token ids of `prompt`, wrapped in the chat template (with the assistant's turn opened) if asked."""
    if chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def open_model(args: argparse.Namespace):
    from swarm.client import DistributedModelForCausalLM
    from swarm.models import load_tokenizer

    tokenizer = load_tokenizer(args.model, args.cache_dir)
    model = DistributedModelForCausalLM.from_pretrained(
        args.model,
        args.initial_peers,
        model_name=args.model_name,
        cache_dir=args.cache_dir,
        device=args.device,
        prompts=args.prompts,
        verify_rate=args.verify_rate,
    )
    return tokenizer, model


def run_generate(args: argparse.Namespace) -> int:
    tokenizer, model = open_model(args)
    with model:
        input_ids = encode_prompt(tokenizer, args.prompt, args.chat)
        output = model.generate(input_ids, **decoding_kwargs(args))
    print(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip())
    return 0


def next_turn_ids(tokenizer, session, messages: list[dict]):
    """The tokens to feed for the latest user turn: what the template adds after the session's text.

    Falls back to the whole conversation (None) when the session's text is not a prefix of it.
    """
    full_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if session.output_ids is None:
        return tokenizer(full_text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    seen = tokenizer.decode(session.output_ids[0], skip_special_tokens=False)
    if not full_text.startswith(seen):
        return None
    return tokenizer(full_text[len(seen) :], return_tensors="pt", add_special_tokens=False)["input_ids"]


def run_chat(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    tokenizer, model = open_model(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    interactive = sys.stdin.isatty()
    with model:
        session = model.inference_session(max_length=args.max_length)
        try:
            while True:
                if interactive:
                    print("you> ", end="", flush=True, file=sys.stderr)
                line = sys.stdin.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                messages.append({"role": "user", "content": line.strip()})
                new_ids = next_turn_ids(tokenizer, session, messages)
                new_tokens = new_ids.shape[1] if new_ids is not None else 0
                needed = session.num_tokens + new_tokens + args.max_new_tokens
                if new_ids is None or needed > args.max_length:
                    session.close()  # start over with the whole conversation in a fresh session
                    session = model.inference_session(max_length=args.max_length)
                    new_ids = next_turn_ids(tokenizer, session, messages)
                before = session.output_ids.shape[1] if session.output_ids is not None else 0
                output = model.generate(new_ids, session=session, streamer=streamer, **decoding_kwargs(args))
                reply = tokenizer.decode(output[0, before + new_ids.shape[1] :], skip_special_tokens=True)
                messages.append({"role": "assistant", "content": reply.strip()})
        finally:
            session.close()
    return 0
