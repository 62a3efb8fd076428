"""Run files: equal stages, an exact TOML round trip, strict validation, and `swarm run init`."""

from __future__ import annotations

import dataclasses
import hashlib
import re

import pytest

from swarm.cli.main import build_parser, main
from swarm.local import run_cli
from swarm.models.tiny import write_tiny_llama
from swarm.training.run import (
    AveragingSettings,
    BatchSettings,
    ModelRef,
    OptimizerSettings,
    RunConfig,
    RunFileError,
    load_run,
    make_run,
    run_to_toml,
    split_stages,
    write_run,
)

HASHES = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(6)]


def a_run(**changes) -> RunConfig:
    """A valid 6-block run whose values are all distinct from the defaults."""
    fields = dict(
        run_id="test-run_1",
        model=ModelRef(source="tiny-llama", name="tiny-llama", num_blocks=6, block_hashes=HASHES),
        stages=[(0, 2), (2, 4), (4, 6)],
        optimizer=OptimizerSettings(
            lr=3e-4, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01, clip_grad_norm=0.5
        ),
        batch=BatchSettings(target_batch_size=32, microbatch_size=8, seq_len=128, max_steps=100),
        sync=True,
        data_order="sequential",
        seed=7,
        averaging=AveragingSettings(
            matchmaking_time=2.0, averaging_timeout=20.0, request_timeout=0.25, aggregator="median", tau=0.5
        ),
    )
    return RunConfig(**{**fields, **changes})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("run-model") / "tiny-run", num_blocks=5)


# --- split_stages ---


@pytest.mark.parametrize(
    "num_blocks, num_stages, expected",
    [
        (6, 2, [(0, 3), (3, 6)]),
        (7, 3, [(0, 3), (3, 5), (5, 7)]),
        (6, 1, [(0, 6)]),
        (5, 5, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),
        (10, 4, [(0, 3), (3, 6), (6, 8), (8, 10)]),
    ],
)
def test_split_stages(num_blocks, num_stages, expected):
    assert split_stages(num_blocks, num_stages) == expected


def test_split_stages_is_contiguous_and_balanced_for_every_size():
    for num_blocks in range(1, 25):
        for num_stages in range(1, num_blocks + 1):
            stages = split_stages(num_blocks, num_stages)
            sizes = [end - start for start, end in stages]
            assert len(stages) == num_stages and stages[0][0] == 0 and stages[-1][1] == num_blocks
            assert all(a[1] == b[0] for a, b in zip(stages, stages[1:], strict=False))
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("num_blocks, num_stages", [(6, 0), (6, 7), (6, -1), (0, 1), (6, 2.0)])
def test_split_stages_rejects_impossible_splits(num_blocks, num_stages):
    with pytest.raises(ValueError, match="num_stages"):
        split_stages(num_blocks, num_stages)


# --- the run and its file ---


def test_stage_of_block_and_num_stages():
    run = a_run()
    assert run.num_stages == 3
    assert [run.stage_of_block(b) for b in range(6)] == [0, 0, 1, 1, 2, 2]
    for block in (-1, 6):
        with pytest.raises(ValueError, match="block"):
            run.stage_of_block(block)


def test_write_then_load_is_the_same_run_and_the_sha256_is_of_the_file_bytes(tmp_path):
    run = a_run()
    path = tmp_path / "run.toml"
    sha256 = write_run(run, path)
    loaded = load_run(path)
    assert loaded.config == run
    assert loaded.sha256 == sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.path == path
    assert isinstance(loaded.config.optimizer.betas, tuple) and loaded.config.stages[0] == (0, 2)
    # the same run always gives the same bytes, so independently written files match
    assert write_run(run, tmp_path / "again.toml") == sha256
    assert write_run(a_run(seed=8), tmp_path / "other.toml") != sha256


def test_defaults_round_trip_and_an_unset_max_steps_is_left_out(tmp_path):
    run = RunConfig(run_id="r", model=a_run().model, stages=[(0, 6)])
    write_run(run, tmp_path / "run.toml")
    assert "max_steps =" not in (tmp_path / "run.toml").read_text()
    assert load_run(tmp_path / "run.toml").config == run
    assert run.optimizer == OptimizerSettings() and run.batch.max_steps is None and run.sync is False


@pytest.mark.parametrize(
    "source",
    [
        'with "quotes" and \\ backslashes',
        "new\nline\ttab\x00nul\x7fdel",
        "ünïcödé ☃ 🙂",
        "C:\\models\\x.gguf",
    ],
)
def test_strings_are_escaped_so_they_read_back_exactly(tmp_path, source):
    run = a_run(model=dataclasses.replace(a_run().model, source=source))
    write_run(run, tmp_path / "run.toml")
    assert load_run(tmp_path / "run.toml").config.model.source == source


@pytest.mark.parametrize("lr", [0.1 + 0.2, 1e-300, 1e16, 2.5e-05, 1 / 3])
def test_floats_read_back_exactly(tmp_path, lr):
    write_run(a_run(optimizer=OptimizerSettings(lr=lr)), tmp_path / "run.toml")
    assert load_run(tmp_path / "run.toml").config.optimizer.lr == lr


def set_key(text: str, key: str, value: str) -> str:
    """Replace the one line `key = ...` of a run file."""
    new, count = re.subn(rf"^{key} = .*$", lambda _: f"{key} = {value}", text, flags=re.M)
    assert count == 1, key
    return new


def drop_line(text: str, line: str) -> str:
    assert text.count(line) == 1, line
    return text.replace(line, "")


BAD_FILES = [
    # (what is wrong, how to make the file wrong, the field the error must name)
    ("run id with a dot", lambda t: set_key(t, "run_id", '"a.b"'), "run_id"),
    ("empty run id", lambda t: set_key(t, "run_id", '""'), "run_id"),
    ("run id too long", lambda t: set_key(t, "run_id", '"' + "x" * 65 + '"'), "run_id"),
    ("run id not a string", lambda t: set_key(t, "run_id", "5"), "run_id"),
    ("stages with a gap", lambda t: set_key(t, "stages", "[[0, 2], [3, 6]]"), "stages[1]"),
    ("stages not from 0", lambda t: set_key(t, "stages", "[[1, 3], [3, 6]]"), "stages[0]"),
    ("stages short of the end", lambda t: set_key(t, "stages", "[[0, 3], [3, 5]]"), "stages"),
    ("stages past the end", lambda t: set_key(t, "stages", "[[0, 3], [3, 7]]"), "stages"),
    ("no stages", lambda t: set_key(t, "stages", "[]"), "stages"),
    ("an empty stage", lambda t: set_key(t, "stages", "[[0, 3], [3, 3], [3, 6]]"), "stages[1]"),
    ("a stage of three numbers", lambda t: set_key(t, "stages", "[[0, 6, 7]]"), "stages[0]"),
    ("a stage of floats", lambda t: set_key(t, "stages", "[[0.0, 6.0]]"), "stages[0]"),
    ("one hash too few", lambda t: drop_line(t, f'    "{HASHES[5]}",\n'), "model.block_hashes"),
    ("an uppercase hash", lambda t: t.replace(HASHES[2], HASHES[2].upper()), "model.block_hashes[2]"),
    ("a short hash", lambda t: t.replace(HASHES[3], HASHES[3][:-1]), "model.block_hashes[3]"),
    ("zero blocks", lambda t: set_key(t, "num_blocks", "0"), "model.num_blocks"),
    ("a DHT name with a space", lambda t: set_key(t, "name", '"bad name"'), "model.name"),
    ("an empty source", lambda t: set_key(t, "source", '""'), "model.source"),
    ("lr = 0", lambda t: set_key(t, "lr", "0.0"), "optimizer.lr"),
    ("negative lr", lambda t: set_key(t, "lr", "-0.001"), "optimizer.lr"),
    ("infinite lr", lambda t: set_key(t, "lr", "inf"), "optimizer.lr"),
    ("nan lr", lambda t: set_key(t, "lr", "nan"), "optimizer.lr"),
    ("lr as a string", lambda t: set_key(t, "lr", '"0.001"'), "optimizer.lr"),
    ("beta2 = 1", lambda t: set_key(t, "betas", "[0.9, 1.0]"), "optimizer.betas[1]"),
    ("negative beta1", lambda t: set_key(t, "betas", "[-0.1, 0.9]"), "optimizer.betas[0]"),
    ("one beta", lambda t: set_key(t, "betas", "[0.9]"), "optimizer.betas"),
    ("eps = 0", lambda t: set_key(t, "eps", "0.0"), "optimizer.eps"),
    ("negative weight decay", lambda t: set_key(t, "weight_decay", "-0.1"), "optimizer.weight_decay"),
    ("negative clipping", lambda t: set_key(t, "clip_grad_norm", "-1.0"), "optimizer.clip_grad_norm"),
    ("target batch 0", lambda t: set_key(t, "target_batch_size", "0"), "batch.target_batch_size"),
    ("boolean batch", lambda t: set_key(t, "target_batch_size", "true"), "batch.target_batch_size"),
    ("microbatch 0", lambda t: set_key(t, "microbatch_size", "0"), "batch.microbatch_size"),
    ("microbatch > target", lambda t: set_key(t, "microbatch_size", "33"), "batch.microbatch_size"),
    ("seq_len 1", lambda t: set_key(t, "seq_len", "1"), "batch.seq_len"),
    ("float seq_len", lambda t: set_key(t, "seq_len", "128.0"), "batch.seq_len"),
    ("max_steps 0", lambda t: set_key(t, "max_steps", "0"), "batch.max_steps"),
    ("sync as a number", lambda t: set_key(t, "sync", "1"), "sync"),
    ("unknown data order", lambda t: set_key(t, "data_order", '"random"'), "data_order"),
    ("negative seed", lambda t: set_key(t, "seed", "-1"), "seed"),
    ("matchmaking 0", lambda t: set_key(t, "matchmaking_time", "0.0"), "averaging.matchmaking_time"),
    (
        "averaging timeout < 0",
        lambda t: set_key(t, "averaging_timeout", "-1.0"),
        "averaging.averaging_timeout",
    ),
    ("request timeout 0", lambda t: set_key(t, "request_timeout", "0"), "averaging.request_timeout"),
    ("empty aggregator", lambda t: set_key(t, "aggregator", '""'), "averaging.aggregator"),
    ("tau 0", lambda t: set_key(t, "tau", "0.0"), "averaging.tau"),
    (
        "a typo in a table",
        lambda t: t.replace("[optimizer]\n", "[optimizer]\nlearning_rate = 0.1\n"),
        "optimizer.learning_rate",
    ),
    ("an unknown top-level key", lambda t: t.replace("seed = 7\n", "seed = 7\nepochs = 3\n"), "epochs"),
    ("an unknown table", lambda t: t + "\n[scheduler]\nwarmup = 10\n", "scheduler"),
    ("a missing key", lambda t: drop_line(t, "eps = 1e-06\n"), "optimizer.eps"),
    ("a missing table", lambda t: t[: t.index("[averaging]")], "averaging"),
    (
        "a value for a table",
        lambda t: t[: t.index("[averaging]")].replace("seed = 7\n", "seed = 7\naveraging = 1\n"),
        "averaging",
    ),
    ("a table for a value", lambda t: drop_line(t, "seed = 7\n") + "\n[seed]\nx = 1\n", "seed"),
]


@pytest.mark.parametrize(
    "mutate, field", [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES]
)
def test_a_bad_file_is_rejected_naming_the_field(tmp_path, mutate, field):
    path = tmp_path / "run.toml"
    write_run(a_run(), path)
    path.write_text(mutate(path.read_text()))
    with pytest.raises(RunFileError) as error:
        load_run(path)
    assert error.value.field == field
    assert str(error.value).startswith(f"{path}: {field} ")


@pytest.mark.parametrize(
    "content", [b"this is not = = toml", b'run_id = "\xff\xfe"\n', b'run_id = "x"\n[a]\n[a]\n']
)
def test_a_file_that_is_not_toml_is_a_value_error_naming_the_path(tmp_path, content):
    path = tmp_path / "broken.toml"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_run(path)


def test_settings_are_checked_when_built_not_only_when_read():
    with pytest.raises(RunFileError, match="optimizer.lr"):
        OptimizerSettings(lr=0)
    with pytest.raises(RunFileError, match="stages"):
        a_run(stages=[(0, 3)])


def test_make_run_checks_cheap_settings_before_touching_the_model():
    # the model does not exist: a bad setting must be reported first, without resolving it
    with pytest.raises(RunFileError, match="run_id"):
        make_run("a.b", "no-such-model", 2)
    with pytest.raises(RunFileError, match="batch.seq_len"):
        make_run("r", "no-such-model", 2, seq_len=1)
    with pytest.raises(RunFileError, match="data_order"):
        make_run("r", "no-such-model", 2, data_order="random")
    with pytest.raises(TypeError, match="lrate"):
        make_run("r", "no-such-model", 2, lrate=0.1)
    with pytest.raises(TypeError, match="optimizer"):
        make_run("r", "no-such-model", 2, optimizer=OptimizerSettings(), lr=0.1)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        make_run("r", "no-such-model", 2)


def test_make_run_hashes_the_checkpoint_and_splits_it(tiny_dir, tmp_path):
    from swarm.models.checkpoint import all_block_hashes, resolve_checkpoint

    run = make_run("r", tiny_dir, 2, model_name="renamed", tau=0.5, batch=BatchSettings(seq_len=8))
    assert run.model == ModelRef(
        source=str(tiny_dir),
        name="renamed",
        num_blocks=5,
        block_hashes=all_block_hashes(resolve_checkpoint(tiny_dir)),
    )
    assert run.stages == [(0, 3), (3, 5)]
    assert run.averaging == AveragingSettings(tau=0.5) and run.batch == BatchSettings(seq_len=8)
    with pytest.raises(RunFileError, match="stages must be between 1 and the model's 5 blocks"):
        make_run("r", tiny_dir, 6)


# --- swarm run init ---

REQUIRED = ["--run-id", "r1", "--model", "m", "--stages", "2", "--out", "run.toml"]


def test_setting_names_are_unique_across_tables_so_flat_flags_and_keywords_are_unambiguous():
    names = [
        f.name
        for cls in (OptimizerSettings, BatchSettings, AveragingSettings)
        for f in dataclasses.fields(cls)
    ]
    names += [f.name for f in dataclasses.fields(RunConfig)]
    assert len(names) == len(set(names))


def test_every_setting_has_a_flag_whose_default_is_the_class_default():
    args = build_parser().parse_args(["run", "init", *REQUIRED])
    for cls in (OptimizerSettings, BatchSettings, AveragingSettings):
        for f in dataclasses.fields(cls):
            assert getattr(args, f.name) == getattr(cls(), f.name), f.name
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    for name in ("sync", "data_order", "seed"):
        assert getattr(args, name) == defaults[name], name


def test_init_writes_the_run_the_flags_describe(tiny_dir, tmp_path, capsys):
    from swarm.models.checkpoint import all_block_hashes, block_hash, resolve_checkpoint

    out = tmp_path / "sub" / "run.toml"
    flags = [
        "--lr", "0.0003", "--betas", "0.8", "0.95", "--eps", "1e-6", "--weight-decay", "0.01",
        "--clip-grad-norm", "0", "--target-batch-size", "32", "--microbatch-size", "8", "--seq-len", "16",
        "--max-steps", "50", "--sync", "--data-order", "sequential", "--seed", "3",
        "--matchmaking-time", "2.5", "--averaging-timeout", "30", "--request-timeout", "1",
        "--aggregator", "median", "--tau", "0.5",
    ]  # fmt: skip
    code = main(["run", "init", "--run-id", "cli-run", "--model", str(tiny_dir), "--stages", "2",
                 "--model-name", "tiny-x", "--out", str(out), *flags])  # fmt: skip
    assert code == 0
    loaded = load_run(out)
    # sha256sum's format, so `sha256sum -c` can check a copy of the file
    assert capsys.readouterr().out == f"{loaded.sha256}  {out}\n"
    checkpoint = resolve_checkpoint(tiny_dir)
    hashes = all_block_hashes(checkpoint)
    assert hashes == [block_hash(checkpoint, b) for b in range(5)]  # not only what a cache says
    assert loaded.config == RunConfig(
        run_id="cli-run",
        model=ModelRef(str(tiny_dir), "tiny-x", 5, hashes),
        stages=[(0, 3), (3, 5)],
        optimizer=OptimizerSettings(
            lr=3e-4, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01, clip_grad_norm=0.0
        ),
        batch=BatchSettings(target_batch_size=32, microbatch_size=8, seq_len=16, max_steps=50),
        sync=True,
        data_order="sequential",
        seed=3,
        averaging=AveragingSettings(
            matchmaking_time=2.5, averaging_timeout=30.0, request_timeout=1.0, aggregator="median", tau=0.5
        ),
    )


def test_init_with_defaults_writes_the_default_settings(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run.toml"
    assert (
        main(["run", "init", "--run-id", "d", "--model", str(tiny_dir), "--stages", "5", "--out", str(out)])
        == 0
    )
    config = load_run(out).config
    assert config.model.name == "tiny-run" and config.stages == [(i, i + 1) for i in range(5)]
    assert (config.optimizer, config.batch, config.averaging) == (
        OptimizerSettings(),
        BatchSettings(),
        AveragingSettings(),
    )
    assert (config.sync, config.data_order, config.seed) == (False, "shuffle", 0)
    # an existing run file is never silently replaced: peers may be using it
    before = out.read_bytes()
    args = ["run", "init", "--run-id", "e", "--model", str(tiny_dir), "--stages", "1", "--out", str(out)]
    assert main(args) == 2
    assert out.read_bytes() == before and "--force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0 and load_run(out).config.run_id == "e"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--stages", "two"], "argument --stages: invalid int value"),
        (["--data-order", "random"], "argument --data-order: invalid choice"),
        (["--lr", "fast"], "argument --lr: invalid float value"),
    ],
)
def test_a_malformed_flag_is_an_argparse_error(tiny_dir, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "init", "--run-id", "r", "--model", str(tiny_dir), "--stages", "2",
              "--out", str(tmp_path / "run.toml"), *flags])  # fmt: skip
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run.toml").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "-1"], "argument --lr: optimizer.lr must be > 0"),
        (["--betas", "0.9", "1"], "argument --betas: optimizer.betas[1] must be in [0, 1)"),
        (["--microbatch-size", "64"], "argument --microbatch-size: batch.microbatch_size must be <="),
        (["--max-steps", "0"], "argument --max-steps: batch.max_steps must be >= 1"),
        (["--tau", "0"], "argument --tau: averaging.tau must be > 0"),
        (["--run-id", "a.b"], "argument --run-id: run_id must be"),
        (["--stages", "6"], "argument --stages: stages must be between 1 and the model's 5 blocks, got 6"),
        (["--model-name", "bad name"], "invalid model name"),
        (["--model", "no-such-model"], "'no-such-model' is neither a checkpoint folder"),
    ],
)
def test_a_bad_value_is_one_line_on_stderr_and_exit_code_2(tiny_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "run.toml"
    args = ["run", "init", "--run-id", "r", "--model", str(tiny_dir), "--stages", "2", "--out", str(out)]
    assert main([*args, *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("swarm run init: error: ") and message in captured.err
    assert captured.err.count("\n") == 1 and captured.out == ""
    assert not out.exists()


def test_the_swarm_command_exits_2_on_a_bad_value(tmp_path):
    # settings are checked before the model is resolved, so this does not even import torch
    args = ["run", "init", "--run-id", "r", "--model", "m", "--stages", "2", "--out", str(tmp_path / "x")]
    result = run_cli([*args, "--seq-len", "1"], timeout=60)
    assert result.returncode == 2
    assert result.stderr == "swarm run init: error: argument --seq-len: batch.seq_len must be >= 2, got 1\n"


def test_run_to_toml_is_what_write_run_writes(tmp_path):
    run = a_run()
    write_run(run, tmp_path / "run.toml")
    assert (tmp_path / "run.toml").read_text() == run_to_toml(run)
