"""Export a run's trained model: gather every stage's blocks and a trainer's head into one HF folder.

The folder is an ordinary Hugging Face Llama checkpoint (config, fp32 safetensors, tokenizer), so
`LlamaForCausalLM.from_pretrained` loads it and `swarm node --model DIR` serves it.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from hivemind.dht import DHT
from hivemind.p2p import P2P
from safetensors import safe_open
from safetensors.torch import save_file

from swarm.dht.swarm_view import live_records
from swarm.models.checkpoint import BLOCK_PREFIX, Checkpoint, resolve_checkpoint
from swarm.training.run import LoadedRun
from swarm.training.state import TrainState, fetch_state

logger = logging.getLogger(__name__)

EMBED, NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
HEAD_NAMES = (EMBED, NORM, LM_HEAD)
# what a checkpoint folder carries besides config and weights; copied when present
EXTRA_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
WEIGHTS_FILE = "model.safetensors"

RunAsync = Callable[[Coroutine[Any, Any, Any]], Any]


# ---- writing the folder ----------------------------------------------------------------------------------


def _checkpoint_shapes(checkpoint: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor in the checkpoint, read from the safetensors headers (no tensor is loaded)."""
    by_file: dict[Path, list[str]] = {}
    for name, file in checkpoint.tensor_files().items():
        by_file.setdefault(file, []).append(name)
    shapes = {}
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name in names:
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def is_tied(checkpoint: Checkpoint) -> bool:
    """Whether the model's LM head is its embedding matrix (then no lm_head.weight is written)."""
    return bool(checkpoint.config.tie_word_embeddings)


def expected_shapes(checkpoint: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Every tensor an exported folder must hold, with its shape in the checkpoint."""
    shapes = _checkpoint_shapes(checkpoint)
    expected = {}
    for block in range(checkpoint.num_blocks):
        names = checkpoint.block_tensor_names(block)
        if not names:
            raise ValueError(f"block {block} has no tensors in checkpoint {checkpoint.path}")
        expected.update({name: shapes[name] for name in names})
    for name in (EMBED, NORM):
        if name not in shapes:
            raise ValueError(f"checkpoint {checkpoint.path} has no {name}")
        expected[name] = shapes[name]
    if not is_tied(checkpoint):
        # a checkpoint without lm_head.weight is trained with the head tied to the embeddings (see
        # load_client_head), so its head has the embeddings' shape
        expected[LM_HEAD] = shapes.get(LM_HEAD, shapes[EMBED])
    return expected


def _weights_to_write(checkpoint: Checkpoint, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors to save, checked against the checkpoint: ValueError naming what is missing or wrong."""
    tensors = dict(tensors)
    tied = is_tied(checkpoint)
    if tied:
        tensors.pop(LM_HEAD, None)  # HF ties it on load; writing it too would only duplicate the embeddings
    elif LM_HEAD not in tensors and EMBED in tensors and LM_HEAD not in checkpoint.tensor_files():
        # the trainer tied the head to the embeddings (no lm_head in the checkpoint) but the config does
        # not say so: write the head out, or HF would initialise it at random
        tensors[LM_HEAD] = tensors[EMBED]
    expected = expected_shapes(checkpoint)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(
        f"{name} has shape {tuple(tensors[name].shape)}, expected {expected[name]}"
        for name in set(expected) & set(tensors)
        if tuple(tensors[name].shape) != expected[name]
    )
    not_float = sorted(
        f"{name} is {tensors[name].dtype}"
        for name in set(expected) & set(tensors)
        if not tensors[name].is_floating_point()
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors not in the model: {_names(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_names(wrong)}")
    if not_float:
        problems.append(f"not floating point: {_names(not_float)}")
    if problems:
        raise ValueError(f"cannot export {checkpoint.name}: " + "; ".join(problems))

    out, seen = {}, set()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu", torch.float32).contiguous()
        if tensor.data_ptr() in seen:  # safetensors refuses tensors that share memory
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        out[name] = tensor
    return out


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def write_hf_folder(
    checkpoint: Checkpoint,
    tensors: dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Write `tensors` as a Hugging Face folder of `checkpoint`'s model at `out_dir` and return its path.

    Writes config.json, model.safetensors (fp32) and the checkpoint's tokenizer and generation files.
    Raises ValueError (writing nothing) if a tensor the model needs is missing, unknown or misshapen, and
    FileExistsError if `out_dir` exists and is not empty, unless `overwrite`.
    """
    out_dir = Path(out_dir)
    weights = _weights_to_write(checkpoint, tensors)
    if _occupied(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # built next to out_dir and renamed into place, so a failed export never leaves a half-written folder
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        config = copy.deepcopy(checkpoint.config)
        config.dtype = torch.float32  # what the weights file holds
        config.save_pretrained(tmp)
        save_file(weights, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        for name in EXTRA_FILES:
            source = checkpoint.path / name
            if source.is_file():
                shutil.copyfile(source, tmp / name)
        moved = False
        if out_dir.is_symlink() or out_dir.is_file():
            out_dir.unlink()
        elif out_dir.exists():  # an empty folder, or the previous export when overwriting
            os.replace(out_dir, old)
            moved = True
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            if moved:
                os.replace(old, out_dir)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _occupied(path: Path) -> bool:
    if path.is_symlink() or path.is_file():
        return True
    return path.is_dir() and any(path.iterdir())


# ---- collecting the state from the swarm -----------------------------------------------------------------


def _live(records: dict, run: LoadedRun) -> list:
    """ONLINE records of this run file, highest step first."""
    return sorted(live_records(records, run.sha256), key=lambda info: info.step, reverse=True)


def _fetch_first(
    p2p: P2P,
    run: LoadedRun,
    run_async: RunAsync,
    candidates: Iterable,
    keep: Callable[[str], bool],
    complete: Callable[[dict[str, torch.Tensor]], str | None],
    what: str,
    timeout: float,
) -> tuple[Any, TrainState]:
    """The state of the first candidate that answers with a complete one; RuntimeError if none does."""
    errors = []
    for info in candidates:
        try:
            state = run_async(fetch_state(p2p, info.peer_id, run.sha256, False, timeout))
        except Exception as e:
            logger.warning("%s: %s did not send its state: %r", what, info.peer_id, e)
            errors.append(f"{info.peer_id}: {type(e).__name__}: {e}")
            continue
        tensors = {name: tensor for name, tensor in state.tensors.items() if keep(name)}
        problem = complete(tensors)
        if problem is not None:
            logger.warning("%s: %s sent an incomplete state: %s", what, info.peer_id, problem)
            errors.append(f"{info.peer_id}: {problem}")
            continue
        return info, TrainState(state.step, tensors)
    detail = f" ({'; '.join(errors)})" if errors else ""
    raise RuntimeError(f"no live peer of {what} sent its state{detail}")


def _stage_names(start: int, end: int) -> Callable[[str], bool]:
    prefixes = tuple(f"{BLOCK_PREFIX}{block}." for block in range(start, end))
    return lambda name: name.startswith(prefixes)


def _stage_complete(start: int, end: int) -> Callable[[dict[str, torch.Tensor]], str | None]:
    def check(tensors: dict[str, torch.Tensor]) -> str | None:
        present = {name[len(BLOCK_PREFIX) :].split(".", 1)[0] for name in tensors}
        empty = [block for block in range(start, end) if str(block) not in present]
        return f"no tensors for blocks {empty}" if empty else None

    return check


def _head_complete(tensors: dict[str, torch.Tensor]) -> str | None:
    missing = [name for name in (EMBED, NORM) if name not in tensors]
    return f"no {', '.join(missing)}" if missing else None


def collect_run_state(
    dht: DHT,
    p2p: P2P,
    run: LoadedRun,
    run_async: RunAsync,
    timeout: float = 120.0,
    head: TrainState | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Download the run's parameters: each stage's from its live peer with the highest step (the next one
    if that fails), the head from the live trainer with the highest step, or `head` when given.

    Returns the tensors and {"stages": [{"stage", "peer_id", "step"}], "trainer": {"peer_id", "step"}}
    (the trainer's peer_id is None for a given `head`). RuntimeError names a stage without an answer.
    """
    from swarm.dht.swarm_view import read_stage, read_trainers

    config = run.config
    tensors: dict[str, torch.Tensor] = {}
    summary: dict = {"stages": [], "trainer": None}
    for stage, (start, end) in enumerate(config.stages):
        peers = _live(read_stage(dht, config.run_id, stage), run)
        if not peers:
            raise RuntimeError(f"stage {stage} (blocks {start}:{end}) has no live peer of this run")
        info, state = _fetch_first(
            p2p,
            run,
            run_async,
            peers,
            _stage_names(start, end),
            _stage_complete(start, end),
            f"stage {stage} (blocks {start}:{end})",
            timeout,
        )
        tensors.update(state.tensors)
        summary["stages"].append({"stage": stage, "peer_id": info.peer_id, "step": state.step})
    if head is None:
        trainers = _live(read_trainers(dht, config.run_id), run)
        if not trainers:
            raise RuntimeError("the run has no live trainer to send the embeddings, norm and LM head")
        info, head = _fetch_first(
            p2p, run, run_async, trainers, HEAD_NAMES.__contains__, _head_complete, "the trainers", timeout
        )
        summary["trainer"] = {"peer_id": info.peer_id, "step": head.step}
    else:
        problem = _head_complete(head.tensors)
        if problem is not None:
            raise ValueError(f"the given head state is incomplete: {problem}")
        summary["trainer"] = {"peer_id": None, "step": head.step}
    tensors.update({name: tensor for name, tensor in head.tensors.items() if name in HEAD_NAMES})
    return tensors, summary


def export_run(
    run: LoadedRun,
    initial_peers: Sequence[str],
    out_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    head: TrainState | None = None,
    timeout: float = 120.0,
    overwrite: bool = False,
) -> dict:
    """Join the swarm as a DHT client, collect the run's state and write it as an HF folder at `out_dir`.

    Returns the summary of `collect_run_state` with "out_dir" added.
    """
    from swarm.client.config import ClientConfig
    from swarm.client.swarm_client import SwarmClient

    config = run.config
    out_dir = Path(out_dir)
    if _occupied(out_dir) and not overwrite:  # before the downloads, which may take long
        raise FileExistsError(f"{out_dir} exists and is not empty")
    checkpoint = resolve_checkpoint(config.model.source, cache_dir, config.model.name)
    client = SwarmClient(
        config.model.name, config.model.num_blocks, ClientConfig(initial_peers=list(initial_peers))
    )
    try:
        tensors, summary = collect_run_state(
            client.dht, client.p2p, run, client.run_async, timeout=timeout, head=head
        )
    finally:
        client.close()
    summary["out_dir"] = str(write_hf_folder(checkpoint, tensors, out_dir, overwrite=overwrite))
    return summary
