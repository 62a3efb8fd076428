"""Verdicts as signed records: built from a real in-process dispute on a tiny Llama span with real RSA-signed
commitments, re-checked at the cost of one operator, and refused (banning their author) when forged."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hivemind.dht.validation import DHTRecord
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer

from swarm.averaging.statements import InvalidStatement
from swarm.dht.identity import owner_marker, peer_id_of
from swarm.dht.keys import owner_subkey, verdicts_key
from swarm.dht.records import RecordError, SwarmRecordValidator, decode_record, encode_record
from swarm.models.span import LlamaSpan
from swarm.models.tiny import tiny_llama_config
from swarm.proto import swarm_pb2
from swarm.utils.tensors import serialize
from swarm.verification.determinism import deterministic_profile
from swarm.verification.dispute import Dispute, HonestParty, run_dispute
from swarm.verification.merkle import commit_trace
from swarm.verification.service import sub_span
from swarm.verification.trace import OPERATOR_INPUTS, perturb_operator, trace_span
from swarm.verification.verdicts import (
    MAX_VERDICT_BYTES,
    FalseVerdict,
    VerdictBook,
    VerdictTooLarge,
    check_commit_signature,
    check_verdict_record,
    decode_verdict,
    evidence_from_bytes,
    make_verdict_record,
    sign_commitment,
)

MODEL = "tiny-verdicts"
START, BLOCKS = 1, 3
CHEAT_BLOCK, CHEAT_OP = 1, "down_proj"  # within the span; block START + 1 of the model
MASK = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
KEYS = {name: RSAPrivateKey() for name in ("honest", "cheater", "third", "referee")}
IDS = {name: peer_id_of(key) for name, key in KEYS.items()}


@pytest.fixture(scope="module", autouse=True)
def deterministic():
    with deterministic_profile():
        yield


@pytest.fixture(scope="module")
def span() -> LlamaSpan:
    torch.manual_seed(0)
    config = tiny_llama_config(num_blocks=START + BLOCKS + 1)
    config._attn_implementation = "sdpa"
    span = LlamaSpan(config, START, START + BLOCKS)
    with torch.no_grad():  # default init is too flat to exercise anything
        for p in span.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    return span.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def hidden() -> torch.Tensor:
    return torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def honest(span, hidden) -> HonestParty:
    trace = trace_span(span, hidden, MASK)
    return HonestParty(trace, commit_trace(trace, span))


@pytest.fixture(scope="module")
def cheater(span, hidden) -> HonestParty:
    """Computed down_proj of block CHEAT_BLOCK off by an ulp, and truthfully reports what it computed."""
    handle = perturb_operator(span, CHEAT_BLOCK, CHEAT_OP, 1)
    try:
        trace = trace_span(span, hidden, MASK)
    finally:
        handle.remove()
    return HonestParty(trace, commit_trace(trace, span))


def signed(name: str, party: HonestParty, mask=MASK, model=MODEL) -> bytes:
    return sign_commitment(KEYS[name], model, party.commitment, mask, None)


@pytest.fixture(scope="module")
def verdict(span, honest, cheater):
    dispute = Dispute(honest.commitment, cheater.commitment, span, attention_mask=MASK)
    verdict = run_dispute(dispute, {"a": honest, "b": cheater})
    assert verdict.losers == ("b",) and (verdict.block, verdict.op) == (CHEAT_BLOCK, CHEAT_OP)
    return verdict


def inputs_of(party: HonestParty, op: str = CHEAT_OP) -> dict[str, torch.Tensor]:
    return {name: party.trace.tensor(CHEAT_BLOCK, name) for name in OPERATOR_INPUTS[op]}


@pytest.fixture(scope="module")
def record(verdict, honest, cheater) -> swarm_pb2.VerdictRecord:
    return make_verdict_record(
        MODEL,
        verdict,
        parties={"a": IDS["honest"], "b": IDS["cheater"]},
        signed_commits={"a": signed("honest", honest), "b": signed("cheater", cheater)},
        input_tensors=inputs_of(honest),
        attention_mask=MASK,
        position_ids=None,
        author=IDS["referee"],
    )


def copy(record: swarm_pb2.VerdictRecord) -> swarm_pb2.VerdictRecord:
    forged = swarm_pb2.VerdictRecord()
    forged.CopyFrom(record)
    return forged


def assert_false(record: swarm_pb2.VerdictRecord, span: LlamaSpan, match: str) -> FalseVerdict:
    with pytest.raises(FalseVerdict, match=match) as raised:
        check_verdict_record(record, span)
    assert raised.value.author == record.author and record.author in str(raised.value)
    assert "ban its author" in str(raised.value)
    return raised.value


def test_a_signed_commitment_names_its_signer_and_nothing_else(honest, cheater):
    blob = signed("honest", honest)
    assert check_commit_signature(blob, honest.commitment) == IDS["honest"]
    assert check_commit_signature(blob, honest.commitment, model=MODEL) == IDS["honest"]
    with pytest.raises(InvalidStatement, match="another commitment"):
        check_commit_signature(blob, cheater.commitment)
    with pytest.raises(InvalidStatement, match="model"):
        check_commit_signature(blob, honest.commitment, model="another-model")
    for garbage in (b"", b"\x93\x00garbage", blob[:-3]):
        with pytest.raises(InvalidStatement):
            check_commit_signature(garbage, honest.commitment)


def test_the_record_round_trips_and_convicts_exactly_the_loser(record, span):
    size = len(record.SerializeToString())
    print(f"\nverdict record: {size} bytes ({record.op} of block {START + record.block})")
    assert 0 < size <= MAX_VERDICT_BYTES
    decoded = decode_record(encode_record(record))
    assert decoded == record and isinstance(decoded, swarm_pb2.VerdictRecord)
    assert decode_verdict(IDS["referee"], record.SerializeToString()) == record
    assert check_verdict_record(decoded, span) == (IDS["cheater"],)
    assert dict(decoded.reasons) == {IDS["cheater"]: "wrong_output"}
    # one block's weights are enough to re-check it
    block = sub_span(span, slice(CHEAT_BLOCK, CHEAT_BLOCK + 1))
    assert (block.start, block.end) == (START + CHEAT_BLOCK, START + CHEAT_BLOCK + 1)
    assert check_verdict_record(decoded, block) == (IDS["cheater"],)
    # a span without that block is the caller's mistake, not the author's
    other = sub_span(span, slice(0, 1))
    with pytest.raises(ValueError, match="lacks") as raised:
        check_verdict_record(decoded, other)
    assert not isinstance(raised.value, FalseVerdict)
    # evidence survives its codec exactly
    assert evidence_from_bytes(record.evidence) == evidence_from_bytes(decoded.evidence)


def test_swapped_losers_ban_the_author(record, span):
    forged = copy(record)
    forged.ClearField("losers")
    forged.losers.append(IDS["honest"])
    forged.ClearField("reasons")
    forged.reasons[IDS["honest"]] = "wrong_output"
    assert_false(forged, span, "does not convict exactly its losers")
    # and blaming both when one was right fails too
    both = copy(record)
    both.losers.append(IDS["honest"])
    both.reasons[IDS["honest"]] = "wrong_output"
    assert_false(both, span, "does not convict exactly its losers")


def test_a_third_partys_commitment_relabelled_cannot_frame_anyone(record, span, honest, cheater, hidden):
    # the cheater's own signed commitment, relabelled as an innocent third peer's
    relabelled = copy(record)
    relabelled.parties[1] = IDS["third"]
    relabelled.ClearField("losers")
    relabelled.losers.append(IDS["third"])
    relabelled.ClearField("reasons")
    relabelled.reasons[IDS["third"]] = "wrong_output"
    assert_false(relabelled, span, f"signed by {IDS['cheater']}, not by {IDS['third']}")
    # the third peer's real signature, but over a commitment of its own (another forward): not the root
    third_trace = trace_span(span, hidden + 1, MASK)
    third = HonestParty(third_trace, commit_trace(third_trace, span))
    relabelled.signed_commits[1] = signed("third", third)
    assert_false(relabelled, span, "not the one")
    # the referee signs the cheater's commitment itself and names the third peer: the signer is the referee
    relabelled.signed_commits[1] = signed("referee", cheater)
    assert_false(relabelled, span, f"signed by {IDS['referee']}")


def test_altered_tensors_mask_or_model_ban_the_author(record, span, honest):
    moved = copy(record)
    tensor = inputs_of(honest)["act_mul"]
    moved.inputs["act_mul"].CopyFrom(serialize(torch.nextafter(tensor, tensor + 1)))
    assert_false(moved, span, "does not convict")
    wrong_name = copy(record)
    wrong_name.inputs["gate_proj"].CopyFrom(wrong_name.inputs["act_mul"])
    assert_false(wrong_name, span, "reads")
    # a mask other than the one the parties signed: attention would compute something else
    masked = copy(record)
    masked.attention_mask.CopyFrom(serialize(torch.ones_like(MASK)))
    assert_false(masked, span, "another attention mask")
    dropped = copy(record)
    dropped.ClearField("attention_mask")
    assert_false(dropped, span, "another attention mask")
    other_model = copy(record)
    other_model.model = "another-model"
    assert_false(other_model, span, "committed to a forward of")
    wrong_block = copy(record)
    wrong_block.block = BLOCKS
    assert_false(wrong_block, span, "not in the signed span")
    wrong_op = copy(record)
    wrong_op.op = "up_proj"  # a real operator, but not the one the evidence is about
    wrong_op.ClearField("inputs")
    for name in OPERATOR_INPUTS["up_proj"]:
        wrong_op.inputs[name].CopyFrom(serialize(honest.trace.tensor(CHEAT_BLOCK, name)))
    assert_false(wrong_op, span, "does not convict")


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],
        lambda data: data[:-7],
        lambda data: b"\xff" * 64,
        lambda data: b"",
    ],
    ids=["half", "truncated-tail", "garbage", "empty"],
)
def test_truncated_or_garbage_records_name_their_author(record, damage):
    with pytest.raises(FalseVerdict) as raised:
        decode_verdict(IDS["referee"], damage(record.SerializeToString()))
    assert raised.value.author == IDS["referee"] and IDS["referee"] in str(raised.value)


def test_garbage_evidence_or_statements_ban_the_author(record, span):
    for evidence in (b"", b"\xc1", b"\x93\x01\x02\x03", record.evidence[:-10]):
        forged = copy(record)
        forged.evidence = evidence
        assert_false(forged, span, "evidence|record")
    forged = copy(record)
    forged.signed_commits[0] = b"\x00not a statement"
    assert_false(forged, span, "unreadable statement")
    forged = copy(record)
    forged.reasons[IDS["cheater"]] = "silent"  # a loss no recomputation can prove
    assert_false(forged, span, "can't be proven")


def test_the_size_cap_refuses_to_build_or_read_large_records(verdict, honest, cheater, record):
    huge = {name: torch.zeros(2, 8, 40_000) for name in OPERATOR_INPUTS[CHEAT_OP]}  # 2.5 MiB
    with pytest.raises(VerdictTooLarge, match="over the limit"):
        make_verdict_record(
            MODEL,
            verdict,
            {"a": IDS["honest"], "b": IDS["cheater"]},
            {"a": signed("honest", honest), "b": signed("cheater", cheater)},
            huge,
            MASK,
            None,
        )
    with pytest.raises(FalseVerdict, match="at most"):
        decode_verdict(IDS["referee"], b"\x00" * (MAX_VERDICT_BYTES + 1))
    oversized = copy(record)
    oversized.inputs["act_mul"].buffer = b"\x00" * (MAX_VERDICT_BYTES + 1)
    with pytest.raises(RecordError, match="exceeds"):
        encode_record(oversized)


def test_a_referee_cannot_build_a_record_it_could_not_defend(verdict, honest, cheater):
    parties = {"a": IDS["honest"], "b": IDS["cheater"]}
    with pytest.raises(InvalidStatement, match="signed by"):
        make_verdict_record(
            MODEL,
            verdict,
            parties,
            {"a": signed("honest", honest), "b": signed("third", cheater)},
            inputs_of(honest),
            MASK,
            None,
        )
    with pytest.raises(ValueError, match="reads"):
        make_verdict_record(
            MODEL,
            verdict,
            parties,
            {"a": signed("honest", honest), "b": signed("cheater", cheater)},
            {},
            MASK,
            None,
        )


def record_in_dht(record: swarm_pb2.VerdictRecord, key_name: str, peer_name: str | None = None) -> DHTRecord:
    peer = IDS[peer_name or key_name]
    return DHTRecord(
        key=verdicts_key(MODEL).encode(),
        subkey=MSGPackSerializer.dumps(owner_subkey(peer, owner_marker(KEYS[key_name]))),
        value=MSGPackSerializer.dumps(encode_record(record)),
        expiration_time=1.0,
    )


def test_the_validator_takes_verdicts_only_from_their_author(record):
    validator = SwarmRecordValidator()
    assert verdicts_key(MODEL) == f"{MODEL}.verdicts"
    with pytest.raises(ValueError):
        verdicts_key("bad name")
    assert validator.validate(record_in_dht(record, "referee"))
    assert not validator.validate(record_in_dht(record, "third"))  # stored in another's subkey
    assert not validator.validate(record_in_dht(record, "third", peer_name="referee"))  # forged subkey
    broken = copy(record)
    broken.losers.append(IDS["third"])  # not a party
    broken.reasons[IDS["third"]] = "wrong_output"
    envelope = {"swarm": "verdict", "data": broken.SerializeToString()}
    value = MSGPackSerializer.dumps(envelope)
    assert not validator.validate(dataclasses.replace(record_in_dht(record, "referee"), value=value))
    with pytest.raises(RecordError, match="losers"):
        decode_record(envelope)
    one_commit = copy(record)
    del one_commit.signed_commits[1]
    with pytest.raises(RecordError, match="signed statement"):
        encode_record(one_commit)


def test_a_verdict_rechecked_inside_generate_holds(record, span):
    """generate() runs under torch.inference_mode, so a span its client loads to re-check a verdict holds
    inference tensors, which have no version counter to remember weight digests by: the verdict must still
    hold and its author must not be banned for it."""
    with torch.inference_mode():
        loaded = LlamaSpan(span.config, START, START + BLOCKS)
        loaded.load_state_dict(span.state_dict())
        assert next(loaded.parameters()).is_inference()
        judgement = VerdictBook(MODEL).consider(IDS["referee"], record, lambda block: loaded)
    assert judgement.false_because is None and judgement.convicted == (IDS["cheater"],)


def test_a_verdict_book_rechecks_once_and_bans_false_authors(record, span):
    loads: list[int] = []

    def span_loader(block: int) -> LlamaSpan:
        loads.append(block)
        return span

    book = VerdictBook(MODEL, num_blocks=START + BLOCKS + 1)
    judgement = book.consider(IDS["referee"], record, span_loader)
    assert judgement.convicted == (IDS["cheater"],) and judgement.false_because is None
    assert book.consider(IDS["referee"], copy(record), span_loader) is None  # the same record: cached
    assert loads == [START + CHEAT_BLOCK]
    assert book.banned() == {IDS["cheater"]}
    assert book.verdicts_against(IDS["cheater"]) == [
        {
            "against": IDS["cheater"],
            "block": START + CHEAT_BLOCK,
            "op": CHEAT_OP,
            "by": IDS["referee"],
            "reason": "wrong_output",
        }
    ]
    assert book.verdicts_against(IDS["honest"]) == []

    # the third peer publishes the verdict with the losers swapped: it is banned, the honest node is not
    framed = copy(record)
    framed.author = IDS["third"]
    framed.ClearField("losers")
    framed.losers.append(IDS["honest"])
    framed.ClearField("reasons")
    framed.reasons[IDS["honest"]] = "wrong_output"
    judgement = book.consider(IDS["third"], framed, span_loader)
    assert judgement.convicted == () and "losers" in judgement.false_because
    assert book.banned() == {IDS["cheater"], IDS["third"]} and book.false_authors() == {IDS["third"]}
    assert book.verdicts_against(IDS["honest"]) == []
    (against_third,) = book.verdicts_against(IDS["third"])
    assert against_third["reason"] == "false_verdict" and against_third["by"] == IDS["third"]
    # a banned author's further records are not even re-checked
    count = len(loads)
    assert book.consider(IDS["third"], framed.SerializeToString(), span_loader) is None
    assert len(loads) == count

    # garbage bytes, a record naming someone else as author, a block beyond the model: the publisher pays
    liar = RSAPrivateKey()
    liar_id = peer_id_of(liar)
    assert book.consider(liar_id, b"\xff" * 100, span_loader).false_because
    impostor = peer_id_of(RSAPrivateKey())
    assert "author" in book.consider(impostor, copy(record), span_loader).false_because
    assert {liar_id, impostor} <= book.false_authors()
    other_book = VerdictBook(MODEL, num_blocks=START + CHEAT_BLOCK)
    assert "no block" in other_book.consider(IDS["referee"], record, span_loader).false_because
    assert IDS["referee"] not in book.banned()
    with pytest.raises(ValueError, match="another"):
        VerdictBook("another-model").consider(IDS["referee"], record, span_loader)
