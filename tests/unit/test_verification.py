"""Refereed verification on a tiny random Llama span: traces, commitments, Merkle proofs, the dispute game."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

import pytest
import torch

from swarm.models.span import LlamaSpan
from swarm.models.tiny import tiny_llama_config
from swarm.verification.determinism import (
    apply_deterministic_profile,
    determinism_profile,
    deterministic_profile,
    same_profile,
)
from swarm.verification.dispute import (
    PARTIES,
    Answer,
    Dispute,
    HonestParty,
    Question,
    recheck_verdict,
    run_dispute,
)
from swarm.verification.merkle import (
    MerkleTree,
    SpanCommitment,
    block_weight_digest,
    commit_trace,
    tensor_digest,
    verify_proof,
)
from swarm.verification.trace import (
    BLOCK_INPUT,
    OPERATOR_INPUTS,
    OPERATORS,
    SpanTrace,
    forward_context,
    operator_ancestors,
    perturb_operator,
    recompute_operator,
    trace_span,
)

START, BLOCKS = 1, 4  # a span that does not start at block 0, so local and model block indices differ
# left padding on the second row, so attention runs with a real mask and non-trivial positions
MASK = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
MAX_ROUNDS = math.ceil(math.log2(BLOCKS)) + math.ceil(math.log2(len(OPERATORS))) + 2


@pytest.fixture(scope="module", autouse=True)
def deterministic():
    """The deterministic profile for this module only: the rest of the suite keeps its settings."""
    with deterministic_profile():
        yield


def _tiny_span(seed: int = 0, attention: str = "sdpa") -> LlamaSpan:
    torch.manual_seed(seed)
    config = tiny_llama_config(num_blocks=START + BLOCKS + 1)
    config._attn_implementation = attention  # what load_config sets for served checkpoints
    span = LlamaSpan(config, START, START + BLOCKS)
    with torch.no_grad():  # as write_tiny_llama does: default init is too flat to exercise anything
        for p in span.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    return span.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def span() -> LlamaSpan:
    return _tiny_span()


@pytest.fixture(scope="module")
def hidden() -> torch.Tensor:
    return torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def honest(span, hidden) -> HonestParty:
    trace = trace_span(span, hidden, MASK)
    return HonestParty(trace, commit_trace(trace, span))


def _cheater(span: LlamaSpan, hidden: torch.Tensor, block: int, op: str, ulps: int = 1) -> HonestParty:
    """A party that computed `op` of `block` off by `ulps` and truthfully reports what it computed."""
    handle = perturb_operator(span, block, op, ulps)
    try:
        trace = trace_span(span, hidden, MASK)
    finally:
        handle.remove()
    return HonestParty(trace, commit_trace(trace, span))


def _play(span: LlamaSpan, parties: dict[str, object], mask: torch.Tensor | None = MASK):
    a, b = (parties[name].commitment for name in PARTIES)
    return run_dispute(Dispute(a, b, span, attention_mask=mask), parties)


class LyingParty:
    """Claims the other party's digests, to steer the bisection away from its own fault."""

    def __init__(self, own: HonestParty, claims_from: HonestParty):
        self.own, self.claims_from, self.commitment = own, claims_from, own.commitment

    def respond(self, question: Question) -> Answer:
        answer = self.own.respond(question)
        if not question.tensors:
            answer.digests = self.claims_from.respond(question).digests
        return answer


class SilentParty:
    """Answers like `inner` until round `from_round`, or until it is asked for tensors, then says nothing."""

    def __init__(self, inner: HonestParty, from_round: int | None = None):
        self.inner, self.from_round, self.commitment = inner, from_round, inner.commitment

    def respond(self, question: Question) -> Answer | None:
        silent = question.tensors if self.from_round is None else question.round >= self.from_round
        return None if silent else self.inner.respond(question)


class TensorTamperingParty:
    """Answers digests honestly but sends tensors moved by one ulp."""

    def __init__(self, inner: HonestParty):
        self.inner, self.commitment = inner, inner.commitment

    def respond(self, question: Question) -> Answer:
        answer = self.inner.respond(question)
        answer.tensors = {ref: torch.nextafter(t, t + 1) for ref, t in answer.tensors.items()}
        return answer


def test_profile_pins_threads_and_deterministic_kernels():
    assert torch.get_num_threads() == 1
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert os.environ["MKL_DYNAMIC"] == os.environ["OMP_DYNAMIC"] == "FALSE"
    profile = determinism_profile(torch.float32, "cpu")
    assert all(isinstance(value, str) for value in profile.values())
    assert profile["dtype"] == "float32" and profile["device"].startswith("cpu:")
    assert profile["threads"] == "1" and profile["deterministic"] == "True" and profile["tf32"] == "False"
    assert same_profile(profile, determinism_profile("float32", "cpu"))
    assert not same_profile(profile, determinism_profile(torch.bfloat16, "cpu"))
    assert not same_profile(profile, {**profile, "transformers": "0.0"})
    assert not same_profile(profile, {k: v for k, v in profile.items() if k != "threads"})
    with pytest.raises(ValueError):
        apply_deterministic_profile(threads=0)


def test_trace_output_is_the_span_forward_bit_for_bit(span, hidden, honest):
    trace = honest.trace
    assert torch.equal(trace.output, span(hidden, attention_mask=MASK))
    assert len(trace.blocks) == BLOCKS
    for block, ops in enumerate(trace.blocks):
        assert [name for name, _ in ops] == list(OPERATORS)
        previous = trace.input if block == 0 else trace.blocks[block - 1][-1][1]
        assert trace.tensor(block, BLOCK_INPUT) is previous
    assert torch.equal(trace.blocks[-1][-1][1], trace.output)
    assert torch.equal(trace.input, hidden)
    # the attention, the product in the MLP and the residual are taken from consumers' inputs: real values
    assert trace.tensor(0, "attention").shape == (2, 8, 64)
    assert trace.tensor(0, "act_mul").shape == (2, 8, 128)
    assert not torch.equal(trace.tensor(0, "attn_residual"), trace.tensor(0, "mlp_residual"))


@pytest.mark.parametrize("mask", [MASK, None])
def test_forward_context_is_what_the_span_gives_its_layers(span, hidden, mask):
    seen = {}
    handle = span.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    try:
        span(hidden, attention_mask=mask)
    finally:
        handle.remove()
    context = forward_context(span, torch.zeros_like(hidden), mask)
    if mask is None:  # sdpa's causal flag instead of a mask
        assert context.attention_mask is None and seen["attention_mask"] is None
    else:
        assert torch.equal(context.attention_mask, seen["attention_mask"])
    assert torch.equal(context.position_ids, seen["position_ids"])
    for mine, theirs in zip(context.position_embeddings, seen["position_embeddings"], strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_every_operator_recomputes_bit_for_bit_from_its_inputs(hidden, attention):
    span = _tiny_span(attention=attention)
    trace, context = trace_span(span, hidden, MASK), forward_context(span, hidden, MASK)
    for block, layer in enumerate(span.layers):
        for op in OPERATORS:
            inputs = {name: trace.tensor(block, name).clone() for name in OPERATOR_INPUTS[op]}
            recomputed = recompute_operator(layer, op, inputs, context)
            assert torch.equal(recomputed, trace.tensor(block, op)), (block, op)
    with pytest.raises(ValueError, match="context"):
        inputs = {name: trace.tensor(0, name) for name in OPERATOR_INPUTS["attention"]}
        recompute_operator(span.layers[0], "attention", inputs)
    with pytest.raises(ValueError, match="needs"):
        recompute_operator(span.layers[0], "act_mul", {"gate_proj": trace.tensor(0, "gate_proj")})


def test_operator_inputs_come_earlier_in_the_committed_order():
    assert set(OPERATOR_INPUTS) == set(OPERATORS)
    for position, op in enumerate(OPERATORS):
        for name in OPERATOR_INPUTS[op]:
            assert name == BLOCK_INPUT or OPERATORS.index(name) < position, (op, name)
    assert operator_ancestors("attention") == ("input_layernorm", "q_proj", "k_proj", "v_proj")
    assert operator_ancestors("input_layernorm") == ()
    assert operator_ancestors("mlp_residual") == OPERATORS[:-1]


def test_tensor_digest_binds_dtype_shape_and_bytes():
    x = torch.arange(6, dtype=torch.float32)
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert tensor_digest(x) != tensor_digest(x.view(2, 3))
    assert tensor_digest(x) != tensor_digest(x.view(torch.int32))
    assert tensor_digest(x) != tensor_digest(torch.nextafter(x, x + 1))
    transposed = x.view(2, 3).t()
    assert tensor_digest(transposed) == tensor_digest(transposed.contiguous())
    assert tensor_digest(x.to(torch.bfloat16)) != tensor_digest(x.to(torch.float16))


def test_commitments_are_reproducible_and_serialisable(span, hidden, honest):
    again = commit_trace(trace_span(span, hidden, MASK), span)
    assert again == honest.commitment
    commitment = honest.commitment
    assert SpanCommitment.from_dict(json.loads(json.dumps(commitment.to_dict()))) == commitment
    assert (commitment.start, commitment.end, commitment.num_leaves) == (START, START + BLOCKS, BLOCKS * 13)
    for block in range(BLOCKS):
        assert commitment.block_output_digests[block] == tensor_digest(honest.trace.blocks[block][-1][1])
        assert commitment.block_weight_digests[block] == block_weight_digest(span.layers[block])
    assert len(set(commitment.block_weight_digests)) == BLOCKS
    other = commit_trace(trace_span(span, hidden + 1, MASK), span)
    assert other.input_digest != commitment.input_digest and other.operator_root != commitment.operator_root
    malformed = commitment.to_dict()
    with pytest.raises(ValueError):
        SpanCommitment.from_dict({**malformed, "operator_root": "ab" * 31})
    with pytest.raises(ValueError):
        SpanCommitment.from_dict({**malformed, "num_leaves": 13})
    with pytest.raises(ValueError):
        SpanCommitment.from_dict(
            {**malformed, "block_output_digests": malformed["block_output_digests"][:-1]}
        )


def _leaves(n: int) -> list[bytes]:
    return [hashlib.sha256(bytes([i])).digest() for i in range(n)]


def test_weight_digests_follow_every_change_of_the_weights():
    layer = _tiny_span().layers[0]  # its own: the module's span must keep its weights
    before = block_weight_digest(layer)
    assert block_weight_digest(layer) == before  # remembered, and still the same
    weight = layer.mlp.down_proj.weight
    with torch.no_grad():
        weight[0, 0] = torch.nextafter(weight[0, 0], weight[0, 0] + 1)  # in place, one ulp
    changed = block_weight_digest(layer)
    assert changed != before
    with torch.no_grad():
        weight.data = weight.data.clone()  # same bytes in new storage
    assert block_weight_digest(layer) == changed
    with torch.no_grad():
        weight.data = torch.zeros_like(weight)  # other bytes in new storage
    assert block_weight_digest(layer) not in (before, changed)


@pytest.mark.parametrize("n", range(1, 12))
def test_merkle_proofs_verify_and_tampering_fails(n):
    leaves = _leaves(n)
    tree = MerkleTree(leaves)
    for index, leaf in enumerate(leaves):
        proof = tree.proof(index)
        assert (len(proof) == 0) if n == 1 else (1 <= len(proof) <= math.ceil(math.log2(n)))
        assert verify_proof(tree.root, leaf, index, proof, n)
        assert not verify_proof(tree.root, hashlib.sha256(leaf).digest(), index, proof, n)
        assert not verify_proof(tree.root, leaf, index, (*proof, tree.root), n)
        if n > 1:
            assert not verify_proof(tree.root, leaf, (index + 1) % n, proof, n)
            assert not verify_proof(tree.root, leaf, index, proof[:-1], n)
            forged = bytes([proof[0][0] ^ 1]) + proof[0][1:]
            assert not verify_proof(tree.root, leaf, index, (forged, *proof[1:]), n)
    assert not verify_proof(tree.root, leaves[0], n, tree.proof(0), n)


def test_a_leaf_cannot_pose_as_an_inner_node():
    a, b, c, d = _leaves(4)
    tree = MerkleTree([a, b, c, d])
    left, right = MerkleTree([a, b]).root, MerkleTree([c, d]).root  # the tree's own inner nodes
    assert tree.proof(0)[-1] == right
    # the classic second preimage: present an inner node's preimage (its children's hashes) as a leaf of
    # a shorter tree; it would verify if leaves and inner nodes were hashed alike
    children = hashlib.sha256(b"\x00" + a).digest() + hashlib.sha256(b"\x00" + b).digest()
    assert hashlib.sha256(b"\x01" + children).digest() == left
    assert not verify_proof(tree.root, children, 0, (right,), 2)
    assert MerkleTree([left, right]).root != tree.root


CHEATS = [
    (0, "input_layernorm"),  # the very first operator of the span
    (1, "q_proj"),  # its siblings k and v agree: the inputs round must walk back from attention
    (1, "attention"),
    (2, "down_proj"),
    (3, "v_proj"),
    (1, "attn_residual"),  # a value transformers computes inline, moved for every reader of it
    (3, "mlp_residual"),  # the span's output itself
]


@pytest.mark.parametrize("cheater", PARTIES)
@pytest.mark.parametrize("block, op", CHEATS)
def test_a_one_ulp_lie_is_pinned_to_its_block_and_operator(span, hidden, honest, block, op, cheater):
    lie = _cheater(span, hidden, block, op)
    assert not torch.equal(lie.trace.output, honest.trace.output)  # otherwise there is nothing to dispute
    innocent = "b" if cheater == "a" else "a"
    verdict = _play(span, {cheater: lie, innocent: honest})
    assert verdict.losers == (cheater,) and verdict.reasons == {cheater: "wrong_output"}
    assert (verdict.block, verdict.op, verdict.first_block) == (block, op, START)
    assert verdict.evidence.claimed_outputs[innocent] == verdict.evidence.recomputed_output
    assert verdict.rounds <= MAX_ROUNDS
    inputs = {name: honest.trace.tensor(block, name) for name in OPERATOR_INPUTS[op]}
    assert recheck_verdict(verdict, span, inputs, attention_mask=MASK)


def test_two_parties_that_both_lie_both_lose(span, hidden):
    up, down = _cheater(span, hidden, 2, "gate_proj", ulps=1), _cheater(span, hidden, 2, "gate_proj", ulps=-1)
    verdict = _play(span, {"a": up, "b": down})
    assert verdict.losers == ("a", "b") and (verdict.block, verdict.op) == (2, "gate_proj")


def test_rounds_are_logarithmic_and_bytes_are_mostly_the_fetched_tensors(span, hidden, honest):
    verdict = _play(span, {"a": honest, "b": _cheater(span, hidden, 2, "down_proj")})
    assert verdict.rounds <= MAX_ROUNDS
    fetched = 2 * honest.trace.tensor(2, "act_mul").nbytes  # down_proj's one input, from both parties
    hashes = verdict.bytes_moved - fetched
    # every round moves a few digests with proofs of depth ceil(log2 52) = 6, never a tensor
    assert 0 < hashes <= verdict.rounds * 2 * 4 * (32 * 7 + 8)


def test_a_party_that_lies_during_bisection_loses(span, hidden, honest):
    liar = LyingParty(_cheater(span, hidden, 2, "down_proj"), claims_from=honest)
    verdict = _play(span, {"a": honest, "b": liar})
    assert verdict.losers == ("b",) and verdict.reasons == {"b": "bad_proof"}
    assert verdict.evidence is None and verdict.rounds == 1
    with pytest.raises(ValueError):
        recheck_verdict(verdict, span, {})


class MalformedParty:
    """Sends whatever `make(question)` builds, as a broken or hostile peer might."""

    def __init__(self, inner: HonestParty, make):
        self.commitment, self.make = inner.commitment, make

    def respond(self, question: Question) -> Answer:
        return self.make(question)


@pytest.mark.parametrize(
    "make",
    [
        lambda question: Answer(),
        lambda question: Answer(digests={ref: "00" * 32 for ref in question.refs}),
        lambda question: Answer(
            digests={ref: b"\x00" * 32 for ref in question.refs}, proofs={ref: ["?"] for ref in question.refs}
        ),
    ],
    ids=["empty", "text digests", "text proof"],
)
def test_a_malformed_answer_is_a_failed_proof(span, hidden, honest, make):
    verdict = _play(span, {"a": honest, "b": MalformedParty(_cheater(span, hidden, 2, "up_proj"), make)})
    assert verdict.losers == ("b",) and verdict.reasons == {"b": "bad_proof"}


def test_a_commitment_that_contradicts_its_own_tree_loses(span, hidden, honest):
    lie = _cheater(span, hidden, 0, "o_proj")
    # its list of block outputs claims the honest block 1, its tree holds what it computed
    outputs = list(lie.commitment.block_output_digests)
    outputs[1] = honest.commitment.block_output_digests[1]
    forged = dataclasses.replace(lie.commitment, block_output_digests=tuple(outputs))
    verdict = _play(span, {"a": HonestParty(lie.trace, forged), "b": honest})
    assert verdict.losers == ("a",) and verdict.reasons == {"a": "contradiction"}


@pytest.mark.parametrize("from_round", [1, 3, None])  # None: silent only when asked for tensors
def test_a_silent_party_forfeits(span, hidden, honest, from_round):
    silent = SilentParty(_cheater(span, hidden, 1, "up_proj"), from_round)
    verdict = _play(span, {"a": silent, "b": honest})
    assert verdict.losers == ("a",) and verdict.reasons == {"a": "silent"}
    if from_round is None:
        assert (verdict.block, verdict.op) == (1, "up_proj")
    else:
        assert verdict.rounds == from_round


def test_both_silent_both_lose_and_bad_tensors_lose(span, hidden, honest):
    lie = _cheater(span, hidden, 1, "k_proj")
    verdict = _play(span, {"a": SilentParty(lie, 1), "b": SilentParty(honest, 1)})
    assert verdict.losers == ("a", "b")
    verdict = _play(span, {"a": honest, "b": TensorTamperingParty(lie)})
    assert verdict.losers == ("b",) and verdict.reasons == {"b": "bad_tensor"}


def test_a_verdict_rechecks_and_forgeries_do_not(span, hidden, honest):
    block, op = 1, "attention"
    verdict = _play(span, {"a": honest, "b": _cheater(span, hidden, block, op)})
    assert verdict.losers == ("b",)
    inputs = {name: honest.trace.tensor(block, name) for name in OPERATOR_INPUTS[op]}
    assert recheck_verdict(verdict, span, inputs, attention_mask=MASK)

    # a re-checker needs only the disputed block
    one_block = LlamaSpan(span.config, START + block, START + block + 1).eval()
    one_block.layers[0].load_state_dict(span.layers[block].state_dict())
    assert recheck_verdict(verdict, one_block, inputs, attention_mask=MASK)

    evidence = verdict.evidence
    framed = dataclasses.replace(verdict, losers=("a",), reasons={"a": "wrong_output"})
    assert not recheck_verdict(framed, span, inputs, attention_mask=MASK)
    swapped = dict(zip(PARTIES, reversed(evidence.claimed_outputs.values()), strict=True))
    framed = dataclasses.replace(
        verdict, losers=("a",), evidence=dataclasses.replace(evidence, claimed_outputs=swapped)
    )
    assert not recheck_verdict(framed, span, inputs, attention_mask=MASK)
    assert not recheck_verdict(dataclasses.replace(verdict, op="q_proj"), span, inputs, attention_mask=MASK)
    moved = {**inputs, "k_proj": torch.nextafter(inputs["k_proj"], inputs["k_proj"] + 1)}
    assert not recheck_verdict(verdict, span, moved, attention_mask=MASK)
    assert not recheck_verdict(verdict, span, inputs, attention_mask=None)  # another forward's context
    assert not recheck_verdict(verdict, _tiny_span(seed=1), inputs, attention_mask=MASK)  # other weights


def test_dispute_refuses_what_it_cannot_referee_and_misuse(span, hidden, honest):
    with pytest.raises(ValueError, match="nothing to dispute"):
        Dispute(honest.commitment, honest.commitment, span)
    other_input = commit_trace(trace_span(span, hidden + 1, MASK), span)
    with pytest.raises(ValueError, match="different inputs"):
        Dispute(honest.commitment, other_input, span)
    lie = _cheater(span, hidden, 0, "gate_proj")
    dispute = Dispute(honest.commitment, lie.commitment, span, attention_mask=MASK)
    question = dispute.next_question()
    assert question.round == 1 and not question.tensors
    with pytest.raises(RuntimeError):
        dispute.verdict()
    with pytest.raises(ValueError):
        dispute.answer("c", honest.respond(question))
    dispute.answer("a", honest.respond(question))
    with pytest.raises(RuntimeError):
        dispute.answer("a", honest.respond(question))
    dispute.answer("b", lie.respond(question))
    assert dispute.next_question().round == 2
    verdict = run_dispute(dispute, {"a": honest, "b": lie})
    assert verdict.losers == ("b",) and dispute.next_question() is None


def test_perturbation_moves_only_its_operator_and_what_follows(span, hidden, honest):
    lie = _cheater(span, hidden, 1, "k_proj")
    for name in OPERATORS:
        same = torch.equal(lie.trace.tensor(1, name), honest.trace.tensor(1, name))
        assert same == (name in ("input_layernorm", "q_proj", "v_proj")), name
    assert all(torch.equal(lie.trace.tensor(0, op), honest.trace.tensor(0, op)) for op in OPERATORS)
    assert (lie.trace.tensor(1, "k_proj") != honest.trace.tensor(1, "k_proj")).all()
    assert torch.equal(trace_span(span, hidden, MASK).output, honest.trace.output)  # the handle undid it
    with pytest.raises(ValueError):
        perturb_operator(span, 0, "q_proj", ulps=0)


@pytest.mark.parametrize("op", ["q_proj", "attn_residual"])
def test_perturbation_keeps_backward_working(span, hidden, op):
    handle = perturb_operator(span, 1, op)
    try:
        x = hidden.clone().requires_grad_(True)
        span(x, attention_mask=MASK).square().sum().backward()
    finally:
        handle.remove()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_a_trace_has_every_operator_once(span, hidden):
    trace = trace_span(span, hidden)  # no mask: the causal path
    assert isinstance(trace, SpanTrace) and torch.equal(trace.output, span(hidden))
    assert all(len(ops) == len(OPERATORS) for ops in trace.blocks)


def _family_span(model_type: str) -> LlamaSpan:
    from swarm.models.tiny import tiny_family_config

    torch.manual_seed(0)
    config = tiny_family_config(model_type, num_blocks=3)
    config._attn_implementation = "sdpa"
    span = LlamaSpan(config, 0, 3)
    with torch.no_grad():
        for p in span.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    return span.eval().requires_grad_(False)


# longer than the tiny configs' 8-token sliding window, so a full mask in its place would change the attention
LONG_MASK = torch.tensor([[1] * 12, [0, 0] + [1] * 10])


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_other_traced_families_recompute_bit_for_bit_and_convict_only_the_liar(model_type):
    span = _family_span(model_type)
    hidden = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(1))
    trace = trace_span(span, hidden, LONG_MASK)
    assert torch.equal(trace.output, span(hidden, attention_mask=LONG_MASK))
    for block, layer in enumerate(span.layers):
        context = forward_context(span, hidden, LONG_MASK, layer_type=span.layer_types[block])
        for op in OPERATORS:
            inputs = {name: trace.tensor(block, name).clone() for name in OPERATOR_INPUTS[op]}
            recomputed = recompute_operator(layer, op, inputs, context)
            assert torch.equal(recomputed, trace.tensor(block, op)), (model_type, block, op)
    # a lie in a sliding-window layer's attention is pinned there, and the honest party is not convicted
    sliding = span.layer_types.index("sliding_attention") if "sliding_attention" in span.layer_types else 0
    honest = HonestParty(trace, commit_trace(trace, span))
    handle = perturb_operator(span, sliding, "attention", 1)
    try:
        lie_trace = trace_span(span, hidden, LONG_MASK)
    finally:
        handle.remove()
    lie = HonestParty(lie_trace, commit_trace(lie_trace, span))
    verdict = run_dispute(
        Dispute(honest.commitment, lie.commitment, span, attention_mask=LONG_MASK), {"a": honest, "b": lie}
    )
    assert verdict.losers == ("b",) and (verdict.block, verdict.op) == (sliding, "attention")


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "phi3", "mixtral", "qwen3_moe"])
def test_families_without_a_trace_refuse_to_commit(model_type):
    from swarm.verification.trace import UntraceableModel

    span = _family_span(model_type)
    with pytest.raises(UntraceableModel, match=f"{model_type!r} blocks are not traced yet"):
        trace_span(span, torch.randn(1, 4, 64))


def test_a_client_asking_to_spot_check_an_untraced_family_is_told_before_it_joins(tmp_path):
    from swarm.client import DistributedModelForCausalLM
    from swarm.models.tiny import write_tiny_family
    from swarm.verification.trace import UntraceableModel

    path = write_tiny_family(tmp_path / "tiny-gemma2", "gemma2")
    with pytest.raises(UntraceableModel, match="'gemma2' blocks are not traced yet"):
        DistributedModelForCausalLM.from_pretrained(path, ["/ip4/127.0.0.1/tcp/1"], verify_rate=0.5)
