"""Exporting a trained model: the HF folder loads with the trained weights; bad input writes nothing."""

import asyncio
import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaForCausalLM

import swarm.dht.swarm_view as swarm_view
import swarm.training.export as export
from swarm.cli.main import build_parser
from swarm.cli.run import format_status, run_status_dict
from swarm.models.checkpoint import resolve_checkpoint
from swarm.models.tiny import tiny_llama_config, write_tiny_llama, write_tiny_tokenizer
from swarm.proto import swarm_pb2
from swarm.training.export import collect_run_state, write_hf_folder
from swarm.training.run import LoadedRun, ModelRef, RunConfig
from swarm.training.state import TrainState
from swarm.training.trainer import SwarmTrainer

NUM_BLOCKS = 4
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 2]])


@pytest.fixture
def checkpoint(tmp_path):
    path = write_tiny_llama(tmp_path / "m", num_blocks=NUM_BLOCKS)
    write_tiny_tokenizer(path)
    return resolve_checkpoint(path)


def all_tensors(checkpoint) -> dict[str, torch.Tensor]:
    return checkpoint.load_tensors(checkpoint.tensor_files())


def perturbed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor + 0.01 for name, tensor in tensors.items()}


def logits_of(model: LlamaForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def model_from(config, tensors: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"} and (config.tie_word_embeddings or not missing)
    return model


def test_exported_folder_loads_with_the_trained_weights_and_the_tokenizer(checkpoint, tmp_path):
    original = all_tensors(checkpoint)
    trained = perturbed(original)
    out = write_hf_folder(checkpoint, trained, tmp_path / "export")

    loaded = LlamaForCausalLM.from_pretrained(out)
    assert next(loaded.parameters()).dtype == torch.float32
    expected = logits_of(model_from(checkpoint.config, trained))
    torch.testing.assert_close(logits_of(loaded), expected)
    assert not torch.allclose(logits_of(LlamaForCausalLM.from_pretrained(checkpoint.path)), expected)

    assert AutoTokenizer.from_pretrained(out).encode("hi") == AutoTokenizer.from_pretrained(
        checkpoint.path
    ).encode("hi")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    # what `swarm node --model DIR` resolves: the same model, with every block's tensors
    exported = resolve_checkpoint(out)
    assert exported.num_blocks == NUM_BLOCKS
    assert [exported.block_tensor_names(b) for b in range(NUM_BLOCKS)] == [
        checkpoint.block_tensor_names(b) for b in range(NUM_BLOCKS)
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_half_precision_tensors_are_written_as_fp32(checkpoint, tmp_path):
    tensors = {name: t.to(torch.bfloat16) for name, t in all_tensors(checkpoint).items()}
    out = write_hf_folder(checkpoint, tensors, tmp_path / "export")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F32"}
        assert set(f.keys()) == set(tensors)


@pytest.mark.parametrize(
    "break_tensors, message",
    [
        (lambda t: t.pop("model.layers.2.mlp.up_proj.weight"), "model.layers.2.mlp.up_proj.weight"),
        (lambda t: t.pop("lm_head.weight"), "lm_head.weight"),
        (
            lambda t: t.update({"model.layers.1.self_attn.q_proj.weight": torch.zeros(3, 3)}),
            "model.layers.1.self_attn.q_proj.weight has shape (3, 3)",
        ),
        (lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(1)}), "model.layers.9"),
    ],
    ids=["missing block tensor", "missing head", "wrong shape", "unknown tensor"],
)
def test_bad_tensors_raise_and_write_nothing(checkpoint, tmp_path, break_tensors, message):
    tensors = all_tensors(checkpoint)
    break_tensors(tensors)
    out = tmp_path / "export"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        write_hf_folder(checkpoint, tensors, out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_an_existing_export_is_kept_unless_overwriting(checkpoint, tmp_path):
    original = all_tensors(checkpoint)
    out = write_hf_folder(checkpoint, original, tmp_path / "export")
    with pytest.raises(FileExistsError):
        write_hf_folder(checkpoint, perturbed(original), out)
    torch.testing.assert_close(
        resolve_checkpoint(out).load_tensors(["model.norm.weight"])["model.norm.weight"],
        original["model.norm.weight"],
    )
    write_hf_folder(checkpoint, perturbed(original), out, overwrite=True)
    norm = resolve_checkpoint(out).load_tensors(["model.norm.weight"])["model.norm.weight"]
    torch.testing.assert_close(norm, original["model.norm.weight"] + 0.01)
    # a failed overwrite keeps the previous export
    with pytest.raises(ValueError):
        write_hf_folder(checkpoint, {}, out, overwrite=True)
    assert (out / "model.safetensors").is_file()


def test_tied_embeddings_write_no_lm_head_and_still_load(tmp_path):
    config = tiny_llama_config(num_blocks=2)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    write_tiny_tokenizer(tmp_path / "tied")
    checkpoint = resolve_checkpoint(tmp_path / "tied")
    trained = perturbed(all_tensors(checkpoint))
    trained["lm_head.weight"] = trained["model.embed_tokens.weight"]  # as a caller might pass it: ignored

    out = write_hf_folder(checkpoint, trained, tmp_path / "export")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    loaded = LlamaForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(loaded.lm_head.weight, trained["model.embed_tokens.weight"])
    torch.testing.assert_close(logits_of(loaded), logits_of(model_from(loaded.config, trained)))


# ---- the command line ------------------------------------------------------------------------------------


def test_run_export_and_status_flags_parse():
    parser = build_parser()
    args = parser.parse_args(
        ["run", "export", "--run", "r.toml", "--initial-peers", "/ip4/1.2.3.4/tcp/1/p2p/X", "--out", "d"]
    )
    assert (args.run, args.initial_peers, args.out, args.cache_dir, args.force) == (
        "r.toml",
        ["/ip4/1.2.3.4/tcp/1/p2p/X"],
        "d",
        None,
        False,
    )
    assert args.func.__name__ == "run_export"
    args = parser.parse_args(["run", "status", "--run", "r.toml", "--initial-peers", "a", "b", "--json"])
    assert (args.run, args.initial_peers, args.json, args.func.__name__) == (
        "r.toml",
        ["a", "b"],
        True,
        "run_status",
    )
    assert parser.parse_args(["run", "status", "--run", "r.toml", "--initial-peers", "a"]).json is False
    for argv in (["run", "export", "--run", "r.toml", "--initial-peers", "a"], ["run", "status"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 2


def test_train_flags_parse():
    args = build_parser().parse_args(
        [
            "train",
            "--run",
            "r.toml",
            "--data",
            "corpus.txt",
            "--initial-peers",
            "/ip4/1.2.3.4/tcp/1/p2p/X",
            "--max-steps",
            "7",
            "--json",
            "--host",
            "0.0.0.0",
            "--port",
            "31338",
            "--announce-maddrs",
            "/ip4/203.0.113.7/tcp/31338",
            "--identity",
            "id.key",
            "--cache-dir",
            "cache",
            "--export",
            "out",
            "--update-period",
            "2.5",
        ]
    )
    assert args.func.__module__ == "swarm.cli.train"
    assert (args.run, args.data, args.initial_peers, args.max_steps, args.json) == (
        "r.toml",
        "corpus.txt",
        ["/ip4/1.2.3.4/tcp/1/p2p/X"],
        7,
        True,
    )
    assert (args.host, args.port, args.announce_maddrs, args.identity) == (
        "0.0.0.0",
        31338,
        ["/ip4/203.0.113.7/tcp/31338"],
        "id.key",
    )
    assert (args.cache_dir, args.export, args.update_period) == ("cache", "out", 2.5)


def test_train_defaults_are_the_trainers():

    args = build_parser().parse_args(["train", "--run", "r.toml", "--data", "d.txt", "--initial-peers", "a"])
    defaults = inspect.signature(SwarmTrainer).parameters
    assert args.host == defaults["host"].default
    assert args.port == defaults["port"].default
    assert args.update_period == defaults["update_period"].default
    assert (args.max_steps, args.json, args.export, args.identity, args.announce_maddrs) == (
        None,
        False,
        None,
        None,
        [],
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--run", "r.toml", "--initial-peers", "a"],
        ["train", "--data", "d.txt", "--initial-peers", "a"],
        ["train", "--run", "r.toml", "--data", "d.txt", "--initial-peers", "a", "--max-steps", "0"],
    ],
    ids=["no --data", "no --run", "zero steps"],
)
def test_train_without_required_flags_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    assert "swarm train: error:" in capsys.readouterr().err


# ---- collecting from the swarm (records and downloads faked) ---------------------------------------------


def make_run(num_blocks: int = 4, stages=((0, 2), (2, 4))):

    model = ModelRef("m", "m", num_blocks, ["0" * 64] * num_blocks)
    return LoadedRun(RunConfig(run_id="r", model=model, stages=list(stages)), "a" * 64, Path("r.toml"))


def stage_info(peer: str, stage: int, step: int, run_hash: str = "a" * 64, online: bool = True):

    state = swarm_pb2.ServerInfo.ONLINE if online else swarm_pb2.ServerInfo.JOINING
    start, end = make_run().config.stages[stage]
    return swarm_pb2.StageInfo(
        state=state,
        peer_id=peer,
        run_id="r",
        run_hash=run_hash,
        stage=stage,
        start_block=start,
        end_block=end,
        step=step,
        samples=3,
        throughput=12.5,
        queue_length=1,
    )


def trainer_info(peer: str, step: int, run_hash: str = "a" * 64):

    return swarm_pb2.TrainerInfo(
        state=swarm_pb2.ServerInfo.ONLINE, peer_id=peer, run_id="r", run_hash=run_hash, step=step, samples=5
    )


@pytest.fixture
def fake_swarm(monkeypatch):
    """Stage 0: p0 (step 5, fails), p1 (step 4), p2 (step 9, another run), p3 (step 8, joining);
    stage 1: q0 (step 4); trainers: t0 (step 3), t1 (step 2). Returns the peers asked, in order."""

    stages = {
        0: [
            stage_info("p0", 0, 5),
            stage_info("p1", 0, 4),
            stage_info("p2", 0, 9, run_hash="b" * 64),
            stage_info("p3", 0, 8, online=False),
        ],
        1: [stage_info("q0", 1, 4)],
    }
    trainers = [trainer_info("t0", 3), trainer_info("t1", 2)]
    monkeypatch.setattr(
        swarm_view,
        "read_stage",
        lambda dht, run_id, stage, timeout=10.0: {info.peer_id: info for info in stages[stage]},
    )
    monkeypatch.setattr(
        swarm_view,
        "read_trainers",
        lambda dht, run_id, timeout=10.0: {info.peer_id: info for info in trainers},
    )
    asked = []

    async def fetch_state(p2p, peer_id, run_hash, with_optimizer, timeout):
        asked.append(peer_id)
        assert run_hash == "a" * 64 and with_optimizer is False
        if peer_id == "p0":
            raise TimeoutError("p0 is gone")
        step = int(peer_id[1:]) + 10
        if peer_id.startswith("t"):
            names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "optimizer.x"]
        else:
            blocks = (0, 1) if peer_id.startswith("p") else (2, 3)
            names = [f"model.layers.{b}.w" for b in blocks] + ["optimizer.exp_avg.model.layers.0.w"]
        return TrainState(step, {name: torch.full((2,), float(step)) for name in names})

    monkeypatch.setattr(export, "fetch_state", fetch_state)
    return asked


def test_collect_takes_each_stage_from_its_live_peer_with_the_highest_step(fake_swarm):

    tensors, summary = collect_run_state(None, None, make_run(), asyncio.run)
    # p2 (another run) and p3 (not ONLINE) are never asked; p0 fails, so p1 answers for stage 0
    assert fake_swarm == ["p0", "p1", "q0", "t0"]
    assert summary == {
        "stages": [{"stage": 0, "peer_id": "p1", "step": 11}, {"stage": 1, "peer_id": "q0", "step": 10}],
        "trainer": {"peer_id": "t0", "step": 10},
    }
    assert sorted(tensors) == [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.0.w",
        "model.layers.1.w",
        "model.layers.2.w",
        "model.layers.3.w",
        "model.norm.weight",
    ]
    assert float(tensors["model.layers.0.w"][0]) == 11.0 and float(tensors["model.layers.3.w"][0]) == 10.0


def test_collect_uses_a_given_head_instead_of_asking_a_trainer(fake_swarm):

    head = TrainState(7, {"model.embed_tokens.weight": torch.ones(2), "model.norm.weight": torch.ones(2)})
    tensors, summary = collect_run_state(None, None, make_run(), asyncio.run, head=head)
    assert not [peer for peer in fake_swarm if peer.startswith("t")]
    assert summary["trainer"] == {"peer_id": None, "step": 7}
    assert "lm_head.weight" not in tensors and float(tensors["model.norm.weight"][0]) == 1.0


def test_collect_names_the_stage_nobody_answers_for(fake_swarm, monkeypatch):

    run = make_run(num_blocks=6, stages=((0, 2), (2, 4), (4, 6)))
    real = swarm_view.read_stage
    monkeypatch.setattr(
        swarm_view,
        "read_stage",
        lambda dht, run_id, stage, timeout=10.0: {} if stage == 2 else real(dht, run_id, stage),
    )
    with pytest.raises(RuntimeError, match=r"stage 2 \(blocks 4:6\)"):
        collect_run_state(None, None, run, asyncio.run)
    monkeypatch.setattr(
        swarm_view, "read_stage", lambda dht, run_id, stage, timeout=10.0: {"p0": stage_info("p0", 0, 5)}
    )
    with pytest.raises(RuntimeError, match=r"stage 0 \(blocks 0:2\).*p0 is gone"):
        collect_run_state(None, None, run, asyncio.run)


def test_collect_without_a_live_trainer_fails(fake_swarm, monkeypatch):

    monkeypatch.setattr(
        swarm_view,
        "read_trainers",
        lambda dht, run_id, timeout=10.0: {"t9": trainer_info("t9", 3, run_hash="b" * 64)},
    )
    with pytest.raises(RuntimeError, match="no live trainer"):
        collect_run_state(None, None, make_run(), asyncio.run)


def test_status_lists_only_this_runs_records(fake_swarm):

    status = run_status_dict(None, make_run())
    json.dumps(status)  # what --json prints
    assert (status["run_id"], status["run_hash"]) == ("r", "a" * 64)
    assert [(s["stage"], s["start"], s["end"]) for s in status["stages"]] == [(0, 0, 2), (1, 2, 4)]
    assert [(p["peer_id"], p["state"], p["step"]) for p in status["stages"][0]["peers"]] == [
        ("p3", "JOINING", 8),
        ("p0", "ONLINE", 5),
        ("p1", "ONLINE", 4),
    ]
    assert status["stages"][1]["peers"] == [
        {"peer_id": "q0", "state": "ONLINE", "step": 4, "samples": 3, "throughput": 12.5, "queue_length": 1}
    ]
    assert status["trainers"] == [
        {"peer_id": "t0", "state": "ONLINE", "step": 3, "samples": 5, "samples_per_s": 0.0},
        {"peer_id": "t1", "state": "ONLINE", "step": 2, "samples": 5, "samples_per_s": 0.0},
    ]
    assert status["banned"] == []
    text = format_status(status)
    assert "stage 0 (blocks 0:2): 2 online" in text and "p2" not in text and "trainers: 2 online" in text
    assert "banned: 0" in text
    banned = [{"peer_id": "p9", "reason": "equivocated on chunk 3 at step 12", "round": 12}]
    text = format_status(run_status_dict(None, make_run(), banned=banned))
    assert "banned: 1" in text and "p9  at step 12: equivocated on chunk 3" in text


def test_commands_refuse_bad_input_before_joining_the_swarm(checkpoint, tmp_path, capsys):
    from swarm.cli.main import main
    from swarm.training.run import make_run as make_run_file
    from swarm.training.run import write_run

    run_file = tmp_path / "run.toml"
    write_run(make_run_file("r", str(checkpoint.path), 2, cache_dir=tmp_path / "cache"), run_file)
    data = tmp_path / "data.txt"
    data.write_text("some text\n")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    peers = ["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmNotThere"]
    cases = [
        (["train", "--run", str(run_file), "--data", str(tmp_path / "none.txt"), *peers], "--data"),
        (["train", "--run", str(tmp_path / "none.toml"), "--data", str(data), *peers], "none.toml"),
        (["train", "--run", str(run_file), "--data", str(data), *peers, "--export", str(taken)], "--force"),
        (["run", "export", "--run", str(run_file), *peers, "--out", str(taken)], "--force"),
        (["run", "export", "--run", str(data), *peers, "--out", str(tmp_path / "o")], "data.txt"),
        (["run", "status", "--run", str(tmp_path / "none.toml"), *peers], "none.toml"),
    ]
    for argv, mentioned in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and mentioned in err, (argv, err)
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "o").exists()
