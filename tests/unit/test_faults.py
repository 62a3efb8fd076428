"""The --fault registry: parsing, the CLI's testing heading, what each attack sends, and the honest hooks."""

from __future__ import annotations

import asyncio
from statistics import NormalDist

import pytest
import torch

from swarm.cli.main import build_parser
from swarm.testing.faults import (
    ALIE_KEPT,
    ATTACK_SEED,
    ATTACKS,
    FAULTS,
    SERVING_NODE,
    TRAINER,
    TRAINING_NODE,
    ByzantineGradients,
    CombinedFault,
    Fault,
    FaultError,
    Frame,
    PerturbOperator,
    alie_z,
    fault_for,
    parse_fault,
)
from swarm.verification.dispute import Answer


def test_faults_parse_and_bad_ones_are_refused():
    fault = parse_fault("byzantine:sign_flip:start=3")
    assert isinstance(fault, ByzantineGradients) and fault.attack == "sign_flip" and fault.start == 3
    for bad in ("nothing", "byzantine", "byzantine:teleport", "byzantine:sign_flip:begin=3"):
        with pytest.raises(FaultError):
            parse_fault(bad)


def test_fault_flag_is_under_testing_and_checked_by_the_parser(capsys):
    parser = build_parser()
    assert parser.parse_args(["node", "--train", "r.toml", "--fault", "byzantine:ipm"]).fault == [
        "byzantine:ipm"
    ]
    twice = [
        "node",
        "--model",
        "m",
        "--blocks",
        "0:2",
        "--fault",
        "perturb:block=1",
        "--fault",
        "lie_in_dispute",
    ]
    assert parser.parse_args(twice).fault == ["perturb:block=1", "lie_in_dispute"]
    assert parser.parse_args(["node", "--train", "r.toml"]).fault is None  # off unless named
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["train", "--run", "r", "--data", "d", "--initial-peers", "x", "--fault", "nope"])
    assert exit_info.value.code == 2
    node_parser = next(
        a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("node")
    )
    assert "testing:" in node_parser.format_help()


def test_attacks_send_what_btard_describes():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0]])]
    honest_norm = torch.sqrt(sum((g**2).sum() for g in grads))

    def sent(attack: str, step: int = 5, start: int = 0):
        return ByzantineGradients(attack, start=start).corrupt_gradients([g.clone() for g in grads], step)

    assert all(torch.equal(a, -1000 * g) for a, g in zip(sent("sign_flip"), grads, strict=True))
    assert all(torch.equal(a, -0.1 * g) for a, g in zip(sent("ipm"), grads, strict=True))
    direction = sent("random_direction")
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in direction))
    assert norm == pytest.approx(1000 * float(honest_norm), rel=1e-5)
    assert all(
        torch.equal(a, b) for a, b in zip(direction, sent("random_direction"), strict=True)
    )  # shared seed
    assert all(torch.equal(a, g) for a, g in zip(sent("sign_flip", step=1, start=3), grads, strict=True))

    delayed = ByzantineGradients("delayed")
    first = delayed.corrupt_gradients([g.clone() for g in grads], 0)
    later = delayed.corrupt_gradients([g * 7 for g in grads], 1)
    assert all(torch.equal(a, b) for a, b in zip(first, later, strict=True))  # the oldest kept gradient
    assert set(ATTACKS) == {
        "sign_flip",
        "random_direction",
        "delayed",
        "ipm",
        "label_flip",
        "alie",
        "equivocate",
        "bad_reducer",
    }


def test_every_attack_and_option_parses_where_it_applies():
    for attack in ATTACKS:
        fault = parse_fault(f"byzantine:{attack}")
        assert fault.attack == attack and fault.start == 0
        assert parse_fault(f"byzantine:{attack}:start=4").start == 4
        assert attack in FAULTS["byzantine"][0]  # listed in --help
    alie = parse_fault("byzantine:alie:n=16:b=3:start=2")
    assert (alie.n, alie.b, alie.start) == (16, 3, 2)
    assert (parse_fault("byzantine:alie").n, parse_fault("byzantine:alie").b) == (16, 7)
    assert parse_fault("byzantine:bad_reducer:scale=0.1").scale == 0.1
    assert parse_fault("byzantine:bad_reducer").scale == 0.05
    bad = [
        "byzantine:sign_flip:n=16",  # alie's option on another attack
        "byzantine:alie:scale=0.1",  # bad_reducer's option on another attack
        "byzantine:bad_reducer:b=3",
        "byzantine:label_flip:scale=1",
        "byzantine:equivocate:start",  # no value
        "byzantine:alie:n=sixteen",
        "byzantine:alie:n=16:b=9",  # s = 0: no z
        "byzantine:alie:n=1:b=0",
        "byzantine:bad_reducer:scale=nan",
        "byzantine:bad_reducer:scale=-1",
        "byzantine:ipm:start=-1",
        "byzantine:ipm:start=1.5",
    ]
    for text in bad:
        with pytest.raises(FaultError):
            parse_fault(text)
    with pytest.raises(FaultError, match="scale=0.1.*byzantine:alie"):
        parse_fault("byzantine:alie:scale=0.1")


def test_honest_hooks_are_identity():
    fault, tensor = Fault(), torch.tensor([1.0, -2.0])
    grads = [tensor]
    assert fault.corrupt_gradients(grads, 3) is grads
    labels = torch.tensor([0, 5, -100])
    assert fault.corrupt_labels(labels, 3, 10) is labels
    assert fault.tamper_part(tensor, 0, 3) is tensor
    assert fault.tamper_aggregate(tensor, 0, 3) is tensor
    backward = (tensor, tensor * 2)
    assert fault.corrupt_backward(backward, 3) is backward
    for attack in ATTACKS:  # an attack leaves the hooks it does not use honest, even once started
        byzantine = ByzantineGradients(attack)
        if attack != "label_flip":
            assert torch.equal(byzantine.corrupt_labels(labels, 3, 10), labels)
        if attack != "equivocate":
            assert torch.equal(byzantine.tamper_part(tensor, 0, 3), tensor)
        if attack != "bad_reducer":
            assert torch.equal(byzantine.tamper_aggregate(tensor, 0, 3), tensor)


def test_label_flip_flips_labels_but_not_gradients():
    fault = parse_fault("byzantine:label_flip:start=2")
    labels = torch.tensor([[0, 3, -100], [9, -100, 1]])
    assert torch.equal(fault.corrupt_labels(labels, 1, 10), labels)  # not yet
    flipped = fault.corrupt_labels(labels, 2, 10)
    assert torch.equal(flipped, torch.tensor([[9, 6, -100], [0, -100, 8]]))
    grads = [torch.tensor([1.0, 2.0])]
    assert torch.equal(fault.corrupt_gradients(grads, 5)[0], grads[0])


def test_alie_sends_mean_minus_z_std_of_its_own_history():
    assert alie_z(16, 7) == pytest.approx(1.1503, abs=1e-3)
    assert parse_fault("byzantine:alie").z == pytest.approx(1.1503, abs=1e-3)
    assert alie_z(16, 3) == pytest.approx(NormalDist().inv_cdf(10 / 16))  # s = 9 - 3 = 6
    assert alie_z(10, 2) == pytest.approx(NormalDist().inv_cdf(6 / 10))  # s = 6 - 2 = 4
    fault = ByzantineGradients("alie", start=2)
    first = [torch.tensor([1.0, -2.0]), torch.tensor([[3.0]])]
    assert all(torch.equal(a, g) for a, g in zip(fault.corrupt_gradients(first, 0), first, strict=True))
    generator = torch.Generator().manual_seed(0)
    seen = [first]
    for step in range(1, 12):
        grads = [torch.randn(2, generator=generator), torch.randn(1, 1, generator=generator)]
        seen.append(grads)
        sent = fault.corrupt_gradients([g.clone() for g in grads], step)
        if step < 2:
            assert all(torch.equal(a, g) for a, g in zip(sent, grads, strict=True))
            continue
        recent = seen[-ALIE_KEPT:]
        for i, g in enumerate(grads):
            stacked = torch.stack([kept[i] for kept in recent]).double()
            mean = stacked.mean(0)
            std = (stacked - mean).pow(2).mean(0).sqrt()
            expected = mean - alie_z(16, 7) * std
            assert torch.allclose(sent[i].double(), expected, atol=1e-6)
            assert not torch.allclose(sent[i], g)
    assert len(fault.history) == ALIE_KEPT

    alone = ByzantineGradients("alie")  # one gradient kept: std is 0, it sends its own gradient
    assert all(torch.equal(a, g) for a, g in zip(alone.corrupt_gradients(first, 0), first, strict=True))


def test_equivocate_tampers_sent_parts_from_start_and_keeps_gradients_honest():
    fault = parse_fault("byzantine:equivocate:start=3")
    part = torch.tensor([0.5, -1.0, 2.0])
    assert torch.equal(fault.tamper_part(part, 0, 2), part)
    assert torch.equal(fault.tamper_part(part, 4, 3), -1000 * part)
    assert torch.equal(fault.tamper_part(part, 0, 7), -1000 * part)
    grads = [part.clone()]
    assert torch.equal(fault.corrupt_gradients(grads, 5)[0], part)
    assert torch.equal(fault.tamper_aggregate(part, 0, 5), part)


def test_bad_reducer_adds_noise_of_scale_times_the_aggregate_norm():
    fault = parse_fault("byzantine:bad_reducer:scale=0.1:start=1")
    aggregate = torch.tensor([3.0, 4.0, 0.0, 12.0])  # norm 13
    assert torch.equal(fault.tamper_aggregate(aggregate, 2, 0), aggregate)  # not yet
    tampered = fault.tamper_aggregate(aggregate, 2, 5)
    assert tampered.dtype == aggregate.dtype and tampered.shape == aggregate.shape
    assert float((tampered - aggregate).norm()) == pytest.approx(1.3, rel=1e-5)
    assert torch.equal(tampered, fault.tamper_aggregate(aggregate, 2, 5))  # deterministic per (chunk, step)
    assert torch.equal(
        tampered, ByzantineGradients("bad_reducer", scale=0.1).tamper_aggregate(aggregate, 2, 5)
    )
    assert not torch.equal(tampered, fault.tamper_aggregate(aggregate, 3, 5))
    assert not torch.equal(tampered, fault.tamper_aggregate(aggregate, 2, 6))
    generator = torch.Generator().manual_seed(ATTACK_SEED + 2 + 5)
    direction = torch.randn(4, generator=generator, dtype=torch.float64)
    assert torch.allclose((tampered - aggregate).double(), 1.3 * direction / direction.norm(), atol=1e-5)
    zeros = torch.zeros(3)
    assert float(fault.tamper_aggregate(zeros, 0, 5).norm()) == pytest.approx(0.1, rel=1e-5)
    default = parse_fault("byzantine:bad_reducer")
    assert float((default.tamper_aggregate(aggregate, 0, 0) - aggregate).norm()) == pytest.approx(
        0.65, rel=1e-5
    )
    grads = [aggregate.clone()]
    assert torch.equal(fault.corrupt_gradients(grads, 5)[0], aggregate)
    assert torch.equal(fault.tamper_part(aggregate, 0, 5), aggregate)


def test_frame_parses_and_bad_ones_are_refused_clearly():
    assert parse_fault("frame") == Frame(block=None)
    assert parse_fault("frame:block=4") == Frame(block=4)
    assert parse_fault("frame:block=0").block == 0
    assert "frame[:block=K]" in FAULTS["frame"][0] and "%" not in FAULTS["frame"][0]  # --help
    bad = {
        "frame:block=four": "frame option block='four' is not an integer",
        "frame:block=1.5": "is not an integer",
        "frame:block=-2": r"frame needs block >= 0 \(got -2\)",
        "frame:4": "unknown option '4' for frame",
        "frame:victim=x": "unknown option 'victim=x' for frame",
        "frame:block": "unknown option 'block' for frame",
    }
    for text, message in bad.items():
        with pytest.raises(FaultError, match=message):
            parse_fault(text)
    assert build_parser().parse_args(
        ["node", "--model", "m", "--blocks", "0:2", "--fault", "frame"]
    ).fault == ["frame"]


def test_frame_applies_to_serving_nodes_only():
    assert isinstance(fault_for("frame:block=1", SERVING_NODE), Frame)
    for role in (TRAINING_NODE, TRAINER):
        with pytest.raises(FaultError, match="applies to serving nodes only"):
            fault_for("frame", role)


def test_honest_nodes_start_nothing_once_serving_and_combined_faults_run_each_ones_work():
    node = object()  # never looked at by a hook that does nothing
    assert Fault().on_serving(node) is None
    for text in ("perturb:block=1", "lie_in_dispute", "silent_in_dispute"):
        assert parse_fault(text).on_serving(node) is None
    assert fault_for(["perturb:block=1", "lie_in_dispute"], SERVING_NODE).on_serving(node) is None

    ran = []

    class Busy(Fault):
        def __init__(self, label):
            self.name, self.roles, self.label = label, frozenset({SERVING_NODE}), label

        def on_serving(self, node):
            async def work():
                ran.append((self.label, node))

            return work()

    asyncio.run(CombinedFault([parse_fault("lie_in_dispute"), Busy("b")]).on_serving(node))
    asyncio.run(CombinedFault([Busy("c"), Busy("d")]).on_serving(node))
    assert ran[-3:] == [("b", node), ("c", node), ("d", node)]
    frame = parse_fault("frame").on_serving(node)  # the framing coroutine, started by the node
    assert asyncio.iscoroutine(frame)
    frame.close()


def test_a_framing_verdict_passes_every_check_but_the_recomputation():
    """What `--fault frame` publishes: genuine signatures, roots and inputs (a reader that skipped the
    recomputation would convict the victim), yet re-checking it bans its author, never the victim."""
    from hivemind.utils.crypto import RSAPrivateKey

    from swarm.averaging.statements import open_statement
    from swarm.verification.determinism import deterministic_profile
    from swarm.verification.framing import FRAMED_OP, forge_verdict, probe_input
    from swarm.verification.merkle import commit_trace
    from swarm.verification.service import sub_span
    from swarm.verification.trace import trace_span
    from swarm.verification.verdicts import VerdictBook, read_claim, sign_commitment

    span = _tiny_span(2, 5)
    victim_key, framer_key = RSAPrivateKey(), RSAPrivateKey()
    with deterministic_profile():
        hidden = probe_input(span.config.hidden_size, torch.float32)
        shared = sub_span(span, slice(1, 3))  # blocks [3, 5), which the victim serves too
        commitment = commit_trace(trace_span(shared, hidden), shared)  # what an honest victim commits to
        signature = sign_commitment(victim_key, "m", commitment, None, None)
        victim = open_statement(signature)[0]
        framer = open_statement(sign_commitment(framer_key, "m", commitment, None, None))[0]
        record = forge_verdict(
            "m", span, (3, 5), 4, hidden, victim, commitment, signature, framer, framer_key
        )
        record.author = framer  # as publish_verdict fills it in
        assert list(record.losers) == [victim] and dict(record.reasons) == {victim: "wrong_output"}
        assert (record.first_block + record.block, record.op) == (4, FRAMED_OP)
        assert read_claim(record).verdict.losers == ("a",)  # signatures, roots, proofs, inputs: all genuine
        book = VerdictBook("m", num_blocks=6)
        judgement = book.consider(framer, record, lambda block: span)
    assert judgement.convicted == () and "does not convict exactly its losers" in judgement.false_because
    assert book.false_authors() == {framer} and book.banned() == {framer}


def test_faults_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, swarm.testing.faults; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _tiny_span(start: int = 2, end: int = 4):
    from swarm.models.span import LlamaSpan
    from swarm.models.tiny import tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config(num_blocks=6)
    config._attn_implementation = "sdpa"
    return LlamaSpan(config, start, end).eval().requires_grad_(False)


def test_perturb_parses_with_defaults_and_bad_ones_are_refused_clearly():
    fault = parse_fault("perturb:block=3")
    assert isinstance(fault, PerturbOperator) and (fault.block, fault.op, fault.ulps) == (3, "down_proj", 1)
    fault = parse_fault("perturb:block=0,op=q_proj,ulp=4")
    assert (fault.block, fault.op, fault.ulps) == (0, "q_proj", 4)
    assert parse_fault("perturb:block=1:op=attention") == PerturbOperator(1, "attention")  # ":" works too
    assert "perturb:block=K" in FAULTS["perturb"][0] and "mlp_residual" in FAULTS["perturb"][0]  # --help
    bad = {
        "perturb": "perturb needs block=K",
        "perturb:op=q_proj": "perturb needs block=K",
        "perturb:block=two": "block='two' is not an integer",
        "perturb:block=-1": "perturb needs block >= 0",
        "perturb:block=1.5": "is not an integer",
        "perturb:block=1,op=softmax": "unknown operator op='softmax'; expected one of input_layernorm",
        "perturb:block=1,ulp=0": r"perturb needs ulp >= 1 \(got 0\)",
        "perturb:block=1,ulp=-3": r"perturb needs ulp >= 1 \(got -3\)",
        "perturb:block=1,ulp=x": "ulp='x' is not an integer",
        "perturb:block=1,ulps=2": "unknown option 'ulps=2' for perturb",
    }
    for text, message in bad.items():
        with pytest.raises(FaultError, match=message):
            parse_fault(text)


def test_faults_say_which_processes_commit_them():
    assert SERVING_NODE in PerturbOperator.roles and TRAINING_NODE not in PerturbOperator.roles
    assert {
        TRAINING_NODE,
        TRAINER,
    } <= ByzantineGradients.roles and SERVING_NODE not in ByzantineGradients.roles


def test_honest_prepare_span_leaves_the_span_alone_and_perturb_hooks_its_block():
    from swarm.verification.trace import perturb_operator

    span = _tiny_span()
    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    honest = span(hidden)
    assert Fault().prepare_span(span) is None and torch.equal(span(hidden), honest)
    for op in ("down_proj", "act_mul"):  # an operator seen as a module's output, and one seen as an input
        fault = parse_fault(f"perturb:block=3,op={op},ulp=2")
        fault.prepare_span(span)
        lie = span(hidden)
        assert not torch.equal(lie, honest)
        torch.testing.assert_close(lie, honest, rtol=0, atol=1e-4)  # a small lie
        fault.handles.pop().remove()
        assert torch.equal(span(hidden), honest)
        # the same as trace.perturb_operator on local block 1 (absolute block 3 of a span starting at 2)
        handle = perturb_operator(span, 1, op, 2)
        assert torch.equal(span(hidden), lie)
        handle.remove()
    with pytest.raises(FaultError, match=r"block 4 is outside this node's span \[2, 4\)"):
        parse_fault("perturb:block=4").prepare_span(span)
    with pytest.raises(FaultError, match=r"block 1 is outside"):
        parse_fault("perturb:block=1").prepare_span(span)


def test_lazy_backward_skips_the_work_of_training_nodes_only():
    fault = parse_fault("lazy_backward")
    grads = (torch.tensor([1.0, -2.0]), torch.ones(2, 3))
    lazy = fault.corrupt_backward(grads, 0)
    assert [g.shape for g in lazy] == [g.shape for g in grads] and all(not g.any() for g in lazy)
    assert fault.roles == {TRAINING_NODE}
    with pytest.raises(FaultError, match="applies to training nodes only"):
        fault_for("lazy_backward", TRAINER)
    with pytest.raises(FaultError, match="takes no arguments"):
        parse_fault("lazy_backward:now")


def test_several_faults_combine_and_each_must_suit_the_process():
    fault = fault_for(["perturb:block=1", "silent_in_dispute"], SERVING_NODE)
    assert isinstance(fault, CombinedFault) and fault.name == "perturb+silent_in_dispute"
    assert fault.answer_dispute(Answer(digests={1: b"x" * 32})) is None
    with pytest.raises(FaultError, match="applies to serving nodes only"):
        fault_for(["lazy_backward", "perturb:block=1"], TRAINING_NODE)
    # a training node lies in gradient disputes as a serving node does in forward ones
    combined = fault_for(["lazy_backward", "lie_in_dispute"], TRAINING_NODE)
    assert combined.answer_dispute(Answer(digests={1: b"x" * 32})).digests[1] != b"x" * 32
    with pytest.raises(FaultError, match="applies to trainers and training nodes only"):
        fault_for(["byzantine:sign_flip", "lie_in_dispute"], SERVING_NODE)
    with pytest.raises(FaultError, match="takes no arguments"):
        parse_fault("lie_in_dispute:now")


def test_a_dispute_liar_changes_every_digest_and_tensor_it_answers():
    honest = Answer(digests={3: bytes(range(32))}, proofs={3: (b"p" * 32,)}, tensors={4: torch.zeros(2)})
    lie = fault_for("lie_in_dispute", SERVING_NODE).answer_dispute(honest)
    assert lie.digests[3] != honest.digests[3] and len(lie.digests[3]) == 32
    assert lie.proofs == honest.proofs  # the proofs still prove the committed digests, not the lies
    assert torch.equal(lie.tensors[4], torch.ones(2))
    assert honest.digests[3] == bytes(range(32))  # the honest answer itself is left alone
