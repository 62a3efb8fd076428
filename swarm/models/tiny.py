"""Tiny random models written to a folder (Llama, or any registered family): real loading code, fast tests,
no downloads."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(num_blocks: int = 6, hidden_size: int = 64, vocab_size: int = 256) -> LlamaConfig:
    """A small Llama with grouped-query attention (so the KV cache code paths are the real ones)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_blocks,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def write_tiny_llama(path: str | os.PathLike, num_blocks: int = 6, seed: int = 0, **kwargs) -> Path:
    """Save a randomly initialised tiny Llama (safetensors, fp32) into `path` and return it."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(num_blocks=num_blocks, **kwargs)).eval()
    # default init leaves logits nearly flat; scale up so greedy decoding has clear winners
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    return path


TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2 match tiny_llama_config's pad/bos/eos
# UTF-8 never uses these byte values, so a vocabulary can leave them out and still encode any text
_NON_UTF8_BYTES = frozenset({0xC0, 0xC1, *range(0xF5, 0x100)})


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which tokenizers' ByteLevel pre-tokenizer applies."""
    chars = {b: chr(b) for b in (*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100))}
    for offset, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + offset)
    return chars


TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def write_tiny_tokenizer(path: str | os.PathLike, vocab_size: int = 256) -> Path:
    """Save a byte-level tokenizer for the tiny Llama into `path` (no download, no training data).

    Ids: 0 <pad>, 1 <s>, 2 </s>, 3 <unk>, then one token per byte, printable ASCII first, then the rest of
    ASCII, then the bytes UTF-8 uses. All ids are < vocab_size. ASCII text always round-trips exactly
    (vocab_size >= 132); any UTF-8 text does once vocab_size >= 247, and below that the non-ASCII bytes
    left without an id encode as <unk>. Nothing is added around the text (no automatic <s>), and the
    special tokens' own strings in a text encode as those tokens. Its chat template is a plain ChatML-like
    one (`<s>role\ntext</s>\n` per message) over those special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    whitespace = [0x09, 0x0A, 0x0D]
    controls = [b for b in (*range(0x20), 0x7F) if b not in whitespace]
    ascii_bytes = [*range(0x20, 0x7F), *whitespace, *controls]
    other_bytes = [b for b in range(0x80, 0x100) if b not in _NON_UTF8_BYTES]
    minimum = len(TINY_SPECIAL_TOKENS) + len(ascii_bytes)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be >= {minimum} (special tokens and ASCII), got {vocab_size}")
    chars = _byte_level_chars()
    vocab = {token: i for i, token in enumerate(TINY_SPECIAL_TOKENS)}
    for b in (ascii_bytes + other_bytes)[: vocab_size - len(vocab)]:
        vocab[chars[b]] = len(vocab)

    # BPE without merges is a plain byte -> id lookup that maps what it lacks to <unk>
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,  # its cleanup rewrites " ." to "." and would break round trips
        model_max_length=tiny_llama_config().max_position_embeddings,
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    path = Path(path)
    fast.save_pretrained(path)
    return path


def tiny_family_config(model_type: str, num_blocks: int = 3, hidden_size: int = 64, vocab_size: int = 256):
    """A small random config of any registered family: GQA where the family has it, a sliding window of 8
    tokens where it has one (mixed with full layers where its config allows), 4 experts top-2 for MoE."""
    from transformers import AutoConfig

    from swarm.models.families import get_family

    get_family(model_type)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_blocks,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_blocks)]
    extra = {
        "mistral": dict(sliding_window=8),
        "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
        "qwen3": dict(head_dim=16),
        "phi3": dict(sliding_window=None),
        "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
        "qwen3_moe": dict(
            head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True
        ),
        "gemma2": dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            layer_types=alternating,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            tie_word_embeddings=True,
        ),
        "gemma3_text": dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            layer_types=alternating,
            final_logit_softcapping=30.0,
            tie_word_embeddings=True,
        ),
    }.get(model_type, {})
    return AutoConfig.for_model(model_type, **{**common, **extra})


def write_tiny_family(path: str | os.PathLike, model_type: str, num_blocks: int = 3, seed: int = 0) -> Path:
    """Save a randomly initialised tiny model of `model_type` (safetensors, fp32, the family's own
    checkpoint layout as `save_pretrained` writes it) into `path` and return it."""
    from transformers import AutoModelForCausalLM

    config = tiny_family_config(model_type, num_blocks=num_blocks)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # as write_tiny_llama: logits with clear winners
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    return path
