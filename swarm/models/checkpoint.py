"""Find a checkpoint (built-in name, GGUF file or HF folder) and read only the tensors a caller needs."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PretrainedConfig

from swarm.dht.keys import check_model_name
from swarm.models.families import get_family

BLOCK_PREFIX = "model.layers."
HEAD_KEYS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


@dataclass(frozen=True)
class Checkpoint:
    """A local HF-format checkpoint folder of a registered family and the DHT name it is served under."""

    path: Path
    name: str
    config: PretrainedConfig

    @property
    def num_blocks(self) -> int:
        return self.config.num_hidden_layers

    def tensor_files(self) -> dict[str, Path]:
        """Map every tensor name to the safetensors file holding it (single or sharded checkpoints)."""
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.path / file for name, file in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {self.path}")
        mapping = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                mapping.update({name: file for name in f.keys()})
        return mapping

    def load_tensors(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Load just the named tensors, one file at a time, without touching the rest."""
        files = self.tensor_files()
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in files:
                raise KeyError(f"tensor {name} is not in checkpoint {self.path}")
            by_file.setdefault(files[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in file_names:
                    tensor = f.get_tensor(name)
                    out[name] = tensor.to(dtype) if dtype is not None else tensor
        return out

    def block_tensor_names(self, block: int) -> list[str]:
        prefix = f"{BLOCK_PREFIX}{block}."
        return sorted(name for name in self.tensor_files() if name.startswith(prefix))


def default_model_name(name_or_path: str | os.PathLike) -> str:
    """The DHT name of `swarm node --model VALUE` without --model-name: a checkpoint folder's name, a .gguf
    file's stem, else VALUE itself (a built-in name). Reads no weights."""
    text = os.fspath(name_or_path)
    if Path(text).is_dir():
        return Path(text).resolve().name
    if text.endswith(".gguf") and Path(text).is_file():
        return Path(text).stem
    return text


def resolve_checkpoint(
    name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, model_name: str | None = None
) -> Checkpoint:
    """Turn a built-in model name, a GGUF file or an HF folder into a local safetensors checkpoint.

    The DHT name defaults to the built-in name, or the folder / file stem.
    """
    text = os.fspath(name_or_path)
    default_name = default_model_name(text)
    if Path(text).is_dir():
        path = Path(text)
    elif text.endswith(".gguf") and Path(text).is_file():
        from swarm.models.fetch import prepare_gguf

        path = prepare_gguf(text, cache_dir)
    else:
        from swarm.models.catalog import get_builtin
        from swarm.models.fetch import prepare_builtin

        if get_builtin(text) is None:
            raise FileNotFoundError(
                f"{text!r} is neither a checkpoint folder, a .gguf file nor a built-in model "
                "(see `swarm models list`)"
            )
        path = prepare_builtin(text, cache_dir)
    config = load_config(path)
    return Checkpoint(path=Path(path), name=check_model_name(model_name or default_name), config=config)


def load_config(path: str | os.PathLike) -> PretrainedConfig:
    """Read config.json and check that it is a family we can serve (see swarm.models.families)."""
    from transformers import AutoConfig

    config_path = Path(path) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{path} has no config.json")
    family = get_family(json.loads(config_path.read_text()).get("model_type"))
    config = AutoConfig.from_pretrained(path)
    config._attn_implementation = family.attn_implementation  # what from_pretrained would pick
    return config


def hash_tensors(tensors: dict[str, torch.Tensor], strip_prefix: str = "") -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        header = f"{name.removeprefix(strip_prefix)}|{tensor.dtype}|{tuple(tensor.shape)}|"
        digest.update(header.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def block_hash(checkpoint: Checkpoint, block: int) -> str:
    """Hash of one block's weights as stored in the checkpoint (so nodes in any dtype agree)."""
    names = checkpoint.block_tensor_names(block)
    if not names:
        raise KeyError(f"block {block} has no tensors in {checkpoint.path}")
    return hash_tensors(checkpoint.load_tensors(names), strip_prefix=f"{BLOCK_PREFIX}{block}.")


def all_block_hashes(checkpoint: Checkpoint, cache_dir: str | os.PathLike | None = None) -> list[str]:
    """Hashes of every block, cached on disk by the checkpoint files' identity (path, size, mtime)."""
    from swarm.models.fetch import default_cache_dir

    files = sorted(set(checkpoint.tensor_files().values()))
    identity = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    cache_file = (
        default_cache_dir(cache_dir) / "hashes" / f"{hashlib.sha256(identity.encode()).hexdigest()}.json"
    )
    if cache_file.exists():
        cached = json.loads(cache_file.read_text())
        if len(cached) == checkpoint.num_blocks:
            return cached
    hashes = [block_hash(checkpoint, b) for b in range(checkpoint.num_blocks)]
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(hashes))
    os.replace(tmp, cache_file)
    return hashes
