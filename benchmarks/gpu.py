"""The inference and forward benchmarks on a random-weight Llama built from a config (no download).

By default: about 1.1B parameters (TinyLlama's shape), CUDA, bfloat16, swarms of 1, 2 and 3 nodes that
share the one GPU, each against local transformers on the same GPU in the same run. `--preset tiny`
with `--device cpu` runs the same path in seconds, which is how CI keeps it working without a GPU.

    python -m benchmarks.gpu                       # on a machine with a GPU
    python -m benchmarks.gpu --preset tiny --device cpu --dtype float32 --nodes 1 --new-tokens 4
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from benchmarks import forward, inference

PRESETS = {
    # TinyLlama-1.1B's shape: 1.10e9 parameters
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
}


def build_random_llama(preset: str, dtype: torch.dtype, out_dir: Path) -> Path:
    """Save a randomly initialised Llama of `preset`'s shape as an HF folder (seeded: same weights each
    time); reuse the folder if it is already there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = out_dir / f"random-{preset}"
    if (path / "config.json").exists():
        return path
    config = LlamaConfig(
        **PRESETS[preset],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    partial = out_dir / f".random-{preset}.partial"
    model.save_pretrained(partial)
    os.replace(partial, path)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument(
        "--checkpoint-dir", default=None, help="where to keep the random checkpoint (default: a temp folder)"
    )
    parser.add_argument("--skip-forward", action="store_true")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU; use --device cpu (with --preset tiny) elsewhere")

    from swarm.utils.tensors import FLOAT_DTYPES

    with tempfile.TemporaryDirectory(prefix="swarm-gpu-bench-") as tmp:
        out_dir = Path(args.checkpoint_dir or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = str(build_random_llama(args.preset, FLOAT_DTYPES[args.dtype], out_dir))
        common = ["--model", path, "--device", args.device, "--dtype", args.dtype]
        inference.main(
            [
                *common,
                "--nodes",
                *map(str, args.nodes),
                "--new-tokens",
                str(args.new_tokens),
                "--repeats",
                str(args.repeats),
            ]
        )
        if not args.skip_forward:
            forward.main(
                [
                    *common,
                    "--nodes",
                    *map(str, args.nodes),
                    "--batch",
                    str(args.batch),
                    "--seq",
                    str(args.seq),
                    "--repeats",
                    str(args.repeats),
                ]
            )


if __name__ == "__main__":
    main()
