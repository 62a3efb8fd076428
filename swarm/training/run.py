"""A training run is a file: every participant loads the same TOML, and its sha256 keeps different runs apart.

The sha256 of the file's bytes goes into each participant's DHT records, so peers given a different file
(another model, other hyperparameters, even another comment) are never routed to or averaged with.
Kept free of torch so that the CLI starts fast; only `make_run` reads a checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import tomllib
import typing
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DataOrder = Literal["shuffle", "sequential"]
DATA_ORDERS: tuple[str, ...] = typing.get_args(DataOrder)

# hivemind builds averaging prefixes from the run id, and those may not contain dots
RUN_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
BLOCK_HASH_RE = re.compile(r"[0-9a-f]{64}")
# TOML integers are signed 64-bit; anything larger would not read back in other TOML parsers
_INT_MAX = 2**63 - 1


class RunFileError(ValueError):
    """A value a run may not hold; `field` is its dotted name in the file (e.g. "optimizer.lr")."""

    def __init__(self, field: str, detail: str, path: str | os.PathLike | None = None):
        where = f"{os.fspath(path)}: " if path is not None else ""
        super().__init__(f"{where}{field} {detail}")
        self.field, self.detail, self.path = field, detail, path


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RunFileError(name, f"must be a number, got {value!r}")
    if isinstance(value, int) and abs(value) > _INT_MAX:
        raise RunFileError(name, f"is out of range, got {value!r}")
    if not math.isfinite(value):
        raise RunFileError(name, f"must be finite, got {value!r}")
    return float(value)


def _positive(name: str, value: Any) -> float:
    value = _number(name, value)
    if not value > 0:
        raise RunFileError(name, f"must be > 0, got {value!r}")
    return value


def _non_negative(name: str, value: Any) -> float:
    value = _number(name, value)
    if not value >= 0:
        raise RunFileError(name, f"must be >= 0, got {value!r}")
    return value


def _integer(name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RunFileError(name, f"must be an integer, got {value!r}")
    if abs(value) > _INT_MAX:
        raise RunFileError(name, f"is out of range, got {value!r}")
    if minimum is not None and value < minimum:
        raise RunFileError(name, f"must be >= {minimum}, got {value!r}")
    return value


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise RunFileError(name, f"must be a non-empty string, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # e.g. surrogate-escaped bytes of a non-UTF-8 path: TOML can't hold them
        raise RunFileError(name, f"must be valid Unicode, got {value!r}") from None
    return value


def _sequence(name: str, value: Any) -> list:
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        raise RunFileError(name, f"must be a list, got {value!r}")
    return list(value)


def _set(obj: object, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalizing a frozen dataclass in __post_init__


@dataclass(frozen=True)
class ModelRef:
    """Which model the run trains: as given on the command line, its DHT name and its blocks' hashes."""

    source: str  # built-in name, HF folder path or .gguf path, as given
    name: str  # the model's name in the DHT
    num_blocks: int
    block_hashes: list[str]  # swarm.models.checkpoint.block_hash of every block, so all stages start equal

    def __post_init__(self) -> None:
        from swarm.dht.keys import check_model_name  # imports hivemind: only when a run is built or read

        _set(self, "source", _string("model.source", self.source))
        name = _string("model.name", self.name)
        try:
            check_model_name(name)
        except ValueError as e:
            raise RunFileError("model.name", f"is invalid: {e}") from None
        _set(self, "num_blocks", _integer("model.num_blocks", self.num_blocks, minimum=1))
        hashes = _sequence("model.block_hashes", self.block_hashes)
        if len(hashes) != self.num_blocks:
            raise RunFileError(
                "model.block_hashes", f"has {len(hashes)} entries but model.num_blocks is {self.num_blocks}"
            )
        for i, block_hash in enumerate(hashes):
            if not isinstance(block_hash, str) or not BLOCK_HASH_RE.fullmatch(block_hash):
                raise RunFileError(
                    f"model.block_hashes[{i}]", f"must be 64 lowercase hex digits, got {block_hash!r}"
                )
        _set(self, "block_hashes", hashes)


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW hyperparameters, the same on every stage."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_grad_norm: float = 1.0  # max norm of the gradient; 0 turns clipping off

    def __post_init__(self) -> None:
        _set(self, "lr", _positive("optimizer.lr", self.lr))
        betas = _sequence("optimizer.betas", self.betas)
        if len(betas) != 2:
            raise RunFileError("optimizer.betas", f"must be two numbers [beta1, beta2], got {self.betas!r}")
        betas = tuple(_number(f"optimizer.betas[{i}]", beta) for i, beta in enumerate(betas))
        for i, beta in enumerate(betas):
            if not 0 <= beta < 1:
                raise RunFileError(f"optimizer.betas[{i}]", f"must be in [0, 1), got {beta!r}")
        _set(self, "betas", betas)
        _set(self, "eps", _positive("optimizer.eps", self.eps))
        _set(self, "weight_decay", _non_negative("optimizer.weight_decay", self.weight_decay))
        _set(self, "clip_grad_norm", _non_negative("optimizer.clip_grad_norm", self.clip_grad_norm))


@dataclass(frozen=True)
class BatchSettings:
    """How many samples make one optimizer step, and how they travel through the pipeline."""

    target_batch_size: int = 16  # samples per optimizer step, summed over all trainers
    microbatch_size: int = 4  # samples per forward/backward pass through the stages
    seq_len: int = 64  # tokens per sample
    max_steps: int | None = None  # stop after this many optimizer steps; None: never

    def __post_init__(self) -> None:
        _integer("batch.target_batch_size", self.target_batch_size, minimum=1)
        _integer("batch.microbatch_size", self.microbatch_size, minimum=1)
        if self.microbatch_size > self.target_batch_size:
            raise RunFileError(
                "batch.microbatch_size",
                f"must be <= batch.target_batch_size ({self.target_batch_size}), got {self.microbatch_size}",
            )
        _integer("batch.seq_len", self.seq_len, minimum=2)  # next-token targets need at least 2 tokens
        if self.max_steps is not None:
            _integer("batch.max_steps", self.max_steps, minimum=1)


# the aggregators swarm.averaging.group.GroupAverager knows (kept here: the CLI reads run files without torch)
AGGREGATORS = ("centered_clip", "median", "trimmed_mean", "mean")


@dataclass(frozen=True)
class AveragingSettings:
    """How the peers of one stage average their parameters (hivemind matchmaking and all-reduce)."""

    matchmaking_time: float = 1.0  # seconds to gather a group
    averaging_timeout: float = 10.0  # seconds one averaging round may take
    request_timeout: float = 0.5  # seconds to wait for a peer's answer during matchmaking
    # how a group combines its tensors: "centered_clip" (BTARD: robust, with commitments, checks and bans),
    # "median", "trimmed_mean" (robust, commitments only) or "mean" (hivemind's weighted mean: trusts peers)
    aggregator: str = "centered_clip"
    tau: float = (
        1.0  # CenteredClip's clipping radius: how far one peer can pull a chunk's result per iteration
    )
    # members of each group (a stage, the trainers) that recompute another member's gradient each round
    # (BTARD's validation; 0: none). Needs a robust aggregator, whose checks draw the seed that picks them
    validators: int = 1

    def __post_init__(self) -> None:
        _set(self, "matchmaking_time", _positive("averaging.matchmaking_time", self.matchmaking_time))
        _set(self, "averaging_timeout", _positive("averaging.averaging_timeout", self.averaging_timeout))
        _set(self, "request_timeout", _positive("averaging.request_timeout", self.request_timeout))
        _string("averaging.aggregator", self.aggregator)
        if self.aggregator not in AGGREGATORS:
            raise RunFileError(
                "averaging.aggregator", f"must be one of {', '.join(AGGREGATORS)}, got {self.aggregator!r}"
            )
        _set(self, "tau", _positive("averaging.tau", self.tau))
        _integer("averaging.validators", self.validators, minimum=0)


def _check_run_fields(run_id: Any, sync: Any, data_order: Any, seed: Any) -> None:
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id):
        raise RunFileError("run_id", f"must be 1-64 letters, digits, '_' or '-', got {run_id!r}")
    if not isinstance(sync, bool):
        raise RunFileError("sync", f"must be true or false, got {sync!r}")
    if data_order not in DATA_ORDERS:
        raise RunFileError("data_order", f"must be one of {', '.join(DATA_ORDERS)}, got {data_order!r}")
    _integer("seed", seed, minimum=0)


def _check_stages(stages: Any, num_blocks: int) -> list[tuple[int, int]]:
    stages = _sequence("stages", stages)
    if not stages:
        raise RunFileError("stages", "must list at least one [start, end] block range")
    checked, expected = [], 0
    for i, stage in enumerate(stages):
        pair = _sequence(f"stages[{i}]", stage)
        if len(pair) != 2:
            raise RunFileError(f"stages[{i}]", f"must be a [start, end] pair, got {stage!r}")
        start, end = (_integer(f"stages[{i}]", x) for x in pair)
        if start != expected:
            raise RunFileError(
                f"stages[{i}]", f"starts at block {start}, expected {expected} (stages are contiguous from 0)"
            )
        if end <= start:
            raise RunFileError(f"stages[{i}]", f"[{start}, {end}) is empty")
        checked.append((start, end))
        expected = end
    if expected != num_blocks:
        raise RunFileError("stages", f"end at block {expected} but the model has {num_blocks} blocks")
    return checked


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run. Peers train together only if given byte-identical files."""

    run_id: str
    model: ModelRef
    stages: list[tuple[int, int]]  # half-open block ranges [start, end), contiguous, covering the model
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    sync: bool = False  # True: every step waits for the whole target batch and a full average
    data_order: DataOrder = "shuffle"
    seed: int = 0
    averaging: AveragingSettings = field(default_factory=AveragingSettings)

    def __post_init__(self) -> None:
        _check_run_fields(self.run_id, self.sync, self.data_order, self.seed)
        for name, cls in (
            ("model", ModelRef),
            ("optimizer", OptimizerSettings),
            ("batch", BatchSettings),
            ("averaging", AveragingSettings),
        ):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"RunConfig.{name} must be a {cls.__name__}, got {getattr(self, name)!r}")
        _set(self, "stages", _check_stages(self.stages, self.model.num_blocks))

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage_of_block(self, block: int) -> int:
        """Index of the stage that holds `block`."""
        if not 0 <= block < self.model.num_blocks:
            raise ValueError(f"block {block} is not in the model's blocks [0, {self.model.num_blocks})")
        return bisect_right([end for _, end in self.stages], block)


@dataclass(frozen=True)
class LoadedRun:
    """A run file as read: `sha256` is the hex digest of its exact bytes, which is what peers compare."""

    config: RunConfig
    sha256: str
    path: Path


TRAINERS_GROUP = "trainers"


def group_prefix(run: LoadedRun, group: str) -> str:
    """The averaging group prefix of one of a run's groups (`stage{i}` or TRAINERS_GROUP); the run
    file's hash is in it, so peers of another file with the same run id never meet."""
    return f"{run.config.run_id}_{run.sha256[:16]}_{group}"


def group_of_prefix(run: LoadedRun, prefix: str) -> str | None:
    """The group (`stage{i}` or TRAINERS_GROUP) a prefix of this run file names; None for any other."""
    head = group_prefix(run, "")
    return prefix[len(head) :] if prefix.startswith(head) and len(prefix) > len(head) else None


def split_stages(num_blocks: int, num_stages: int) -> list[tuple[int, int]]:
    """Cut `num_blocks` blocks into `num_stages` contiguous ranges [start, end) whose sizes differ by at
    most one; earlier stages get the extra blocks."""
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or not 1 <= num_stages <= num_blocks:
        raise ValueError(
            f"num_stages must be between 1 and the number of blocks ({num_blocks}), got {num_stages!r}"
        )
    size, extra = divmod(num_blocks, num_stages)
    stages, start = [], 0
    for i in range(num_stages):
        end = start + size + (1 if i < extra else 0)
        stages.append((start, end))
        start = end
    return stages


_RUN_FIELDS = ("sync", "data_order", "seed")
_SETTINGS_TABLES = {"optimizer": OptimizerSettings, "batch": BatchSettings, "averaging": AveragingSettings}
# field name -> table, for make_run's keyword arguments and the CLI's flags, which are flat: a field name
# must not appear in two tables
_SETTING_OWNERS = {f.name: table for table, cls in _SETTINGS_TABLES.items() for f in dataclasses.fields(cls)}


def make_run(
    run_id: str,
    model: str | os.PathLike,
    num_stages: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    **settings: Any,
) -> RunConfig:
    """Build a run for `model` (built-in name, HF folder or .gguf) split into `num_stages` equal stages.

    `settings` are RunConfig's own fields (sync, data_order, seed, or whole optimizer / batch / averaging
    objects) or any field of those settings classes by name (lr=..., seq_len=..., tau=...).
    """
    top: dict[str, Any] = {}
    grouped: dict[str, dict[str, Any]] = {table: {} for table in _SETTINGS_TABLES}
    for key, value in settings.items():
        if key in _RUN_FIELDS or key in _SETTINGS_TABLES:
            top[key] = value
        elif key in _SETTING_OWNERS:
            grouped[_SETTING_OWNERS[key]][key] = value
        else:
            raise TypeError(f"make_run() got an unknown setting {key!r}")
    for table, values in grouped.items():
        if values and table in top:
            raise TypeError(f"make_run() got both {table}= and {', '.join(values)}; give one or the other")
        if values:
            top[table] = _SETTINGS_TABLES[table](**values)
    # check everything cheap before resolving the model, which may convert a checkpoint and hash every block
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.name in _RUN_FIELDS}
    _check_run_fields(run_id, **{**defaults, **{k: v for k, v in top.items() if k in _RUN_FIELDS}})

    from swarm.models.checkpoint import all_block_hashes, resolve_checkpoint

    checkpoint = resolve_checkpoint(model, cache_dir, model_name)
    try:
        stages = split_stages(checkpoint.num_blocks, num_stages)
    except ValueError as e:
        detail = f"must be between 1 and the model's {checkpoint.num_blocks} blocks, got {num_stages!r}"
        raise RunFileError("stages", detail) from e
    ref = ModelRef(
        source=os.fspath(model),
        name=checkpoint.name,
        num_blocks=checkpoint.num_blocks,
        block_hashes=all_block_hashes(checkpoint, cache_dir),
    )
    return RunConfig(run_id=run_id, model=ref, stages=stages, **top)


# --- the file format: a tiny deterministic TOML writer, and a strict reader ---

_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_INLINE_LIST_LIMIT = 100  # longer lists are written one element per line, for people reading the file


def _toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:  # TOML forbids raw control characters in strings
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if abs(value) > _INT_MAX:
            raise ValueError(f"{value} does not fit a TOML integer")
        return str(value)
    if isinstance(value, float):
        return repr(value)  # the shortest text that parses back to the same float; always has '.' or 'e'
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        items = [_toml_value(item) for item in value]
        inline = "[" + ", ".join(items) + "]"
        if len(inline) <= _INLINE_LIST_LIMIT:
            return inline
        return "[\n" + "".join(f"    {item},\n" for item in items) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def _toml_keys(obj: Any) -> list[str]:
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            continue
        if value is None:  # TOML has no null: an absent key means None
            lines.append(f"# {f.name} is not set")
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")
    return lines


def run_to_toml(run: RunConfig) -> str:
    """The text `write_run` writes: the same run always gives the same bytes."""
    lines = [
        "# A swarm training run. Give every participant this exact file: peers compare its sha256,",
        "# so any edit, even to a comment, makes a different run.",
        "",
        *_toml_keys(run),
    ]
    for f in dataclasses.fields(run):
        table = getattr(run, f.name)
        if dataclasses.is_dataclass(table):
            lines += ["", f"[{f.name}]", *_toml_keys(table)]
    return "\n".join(lines) + "\n"


def _from_toml(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a parsed TOML table: unknown keys and missing ones are errors.

    Every key must be written out (only None, which TOML cannot spell, may be left out), so that what a
    run means never depends on the defaults of the code that reads it.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RunFileError(f"{prefix}{unknown[0]}", f"is not a known key (known: {', '.join(known)})")
    kwargs = {}
    for name, f in known.items():
        qualified = f"{prefix}{name}"
        if dataclasses.is_dataclass(hints[name]):
            if name not in data:
                raise RunFileError(qualified, "table is missing")
            if not isinstance(data[name], dict):
                raise RunFileError(qualified, f"must be a table, got {data[name]!r}")
            kwargs[name] = _from_toml(hints[name], data[name], f"{qualified}.")
        elif name in data:
            if isinstance(data[name], dict):
                raise RunFileError(qualified, "must be a value, not a table")
            kwargs[name] = data[name]
        elif f.default is not None:
            raise RunFileError(qualified, "is missing")
    return cls(**kwargs)


def parse_run(text: str) -> RunConfig:
    """Validate the text of a run file (raises ValueError / tomllib.TOMLDecodeError)."""
    return _from_toml(RunConfig, tomllib.loads(text))


def write_run(run: RunConfig, path: str | os.PathLike) -> str:
    """Write `run` as TOML to `path` (atomically) and return the sha256 hex of the bytes written."""
    text = run_to_toml(run)
    # a writer bug must never hand peers a file that means something other than `run`
    if parse_run(text) != run:
        raise AssertionError(f"run file text does not read back as the same run:\n{text}")
    data = text.encode("utf-8")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers never see a half-written run file
    finally:
        tmp.unlink(missing_ok=True)
    return hashlib.sha256(data).hexdigest()


def load_run(path: str | os.PathLike) -> LoadedRun:
    """Read and validate a run file: ValueError naming the path (and the field) if it is not a valid run,
    OSError if it cannot be read."""
    path = Path(path)
    data = path.read_bytes()  # hash and parse the same bytes, even if the file changes meanwhile
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path} is not a TOML run file: {e}") from None
    try:
        config = _from_toml(RunConfig, table)
    except RunFileError as e:
        raise RunFileError(e.field, e.detail, path) from None
    return LoadedRun(config=config, sha256=hashlib.sha256(data).hexdigest(), path=path)
