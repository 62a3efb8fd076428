"""The bisection game that decides which of two parties computed a span's forward wrongly (Verde).

Both parties committed (SpanCommitment) to traces of the same forward and their outputs differ. The
referee asks both the same questions, each answer proven against the party's committed Merkle root:

1. blocks: bisect over the blocks' outputs to a block whose input they agree on and whose output differs;
2. operators: bisect over that block's operator outputs the same way;
3. inputs: operator outputs are not a chain (q, k and v are siblings), so ask, in one round, the digests
   of every operator the candidate depends on, and walk down to one whose inputs all agree;
4. fetch: ask for that operator's input tensors, recompute it with the referee's weights, and the party
   whose committed output differs from the recomputation loses (both, if both differ).

A party that is silent (the transport calls forfeit, e.g. at a deadline), sends an answer that fails its
proof, or contradicts its own commitment, loses at once. Rounds: ceil(log2 blocks) + ceil(log2 13) + 2.

The state machine knows nothing of transport: next_question() says what to ask, answer()/forfeit() feed
it, verdict() tells the outcome. run_dispute() drives it with in-process parties.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from swarm.models.span import LlamaSpan
from swarm.verification.merkle import (
    DIGEST_SIZE,
    MerkleTree,
    SpanCommitment,
    block_weight_digest,
    operator_digests,
    operator_leaf,
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
    recompute_operator,
)

PARTIES = ("a", "b")
SPAN_INPUT = -1
"""The ref of the span's input, which commitments carry as input_digest rather than as a leaf."""
QUESTION_REF_SIZE = 8  # bytes a question spends naming one ref, for the bytes_moved count

_OPS = len(OPERATORS)
_BLOCK_OUTPUT = _OPS - 1  # mlp_residual is the block's output


@dataclass(frozen=True)
class Question:
    """One round: the same question to both parties. A ref is a leaf index (operator_leaf) or SPAN_INPUT."""

    round: int
    refs: tuple[int, ...]
    tensors: bool = False  # False: each ref's digest and Merkle proof; True: the tensors themselves


@dataclass
class Answer:
    """A party's reply to a Question."""

    digests: dict[int, bytes] = field(default_factory=dict)
    proofs: dict[int, tuple[bytes, ...]] = field(default_factory=dict)
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)

    def size(self) -> int:
        """Bytes on the wire: 32 per digest and proof node, plus the tensors' raw bytes."""
        hashes = len(self.digests) + sum(len(proof) for proof in self.proofs.values())
        return DIGEST_SIZE * hashes + sum(t.numel() * t.element_size() for t in self.tensors.values())


class Responder(Protocol):
    def respond(self, question: Question) -> Answer | None:
        """The answer, or None for no answer (the party forfeits)."""
        ...


class HonestParty:
    """Answers every question truthfully from its trace and its commitment to it."""

    def __init__(self, trace: SpanTrace, commitment: SpanCommitment, leaves: Sequence[bytes] | None = None):
        """`leaves`: the trace's operator_digests when the caller has them (hashing a trace costs about
        as much as computing it); checked against the commitment either way."""
        self.trace, self.commitment = trace, commitment
        self.tree = MerkleTree(operator_digests(trace) if leaves is None else leaves)
        if self.tree.root != commitment.operator_root:
            raise ValueError("the commitment is not to this trace")

    def respond(self, question: Question) -> Answer:
        if question.tensors:
            return Answer(tensors={ref: self._tensor(ref) for ref in question.refs})
        answer = Answer()
        for ref in question.refs:
            if ref == SPAN_INPUT:
                answer.digests[ref] = self.commitment.input_digest
            else:
                answer.digests[ref] = self.tree.leaves[ref]
                answer.proofs[ref] = self.tree.proof(ref)
        return answer

    def _tensor(self, ref: int) -> torch.Tensor:
        if ref == SPAN_INPUT:
            return self.trace.input
        block, op = divmod(ref, _OPS)
        return self.trace.blocks[block][op][1]


@dataclass(frozen=True)
class Evidence:
    """What lets anyone re-check a verdict at the cost of one operator (see recheck_verdict)."""

    num_leaves: int
    roots: dict[str, bytes]  # each party's committed operator_root
    span_input_digest: bytes
    input_refs: dict[str, int]  # the operator's input name -> its ref
    input_digests: dict[str, bytes]  # agreed by both parties
    input_proofs: dict[str, dict[str, tuple[bytes, ...]]]  # party -> input name -> proof (not SPAN_INPUT)
    output_ref: int
    claimed_outputs: dict[str, bytes]  # party -> its committed digest of the operator's output
    output_proofs: dict[str, tuple[bytes, ...]]
    recomputed_output: bytes
    weight_digest: bytes  # the referee's block weights


@dataclass(frozen=True)
class Verdict:
    """The outcome of a dispute. block is an index within the span (first_block + block in the model)."""

    losers: tuple[str, ...]
    reasons: dict[str, str]  # loser -> wrong_output | silent | bad_proof | contradiction | bad_tensor
    rounds: int
    bytes_moved: int
    first_block: int
    block: int | None = None  # set once the disputed block is found
    op: str | None = None  # set once the disputed operator is found
    evidence: Evidence | None = None  # set when the referee recomputed the operator


class RoundReferee:
    """The rounds of a dispute between parties "a" and "b": one question to both at a time (next_question),
    their answers (answer/forfeit) and, once settled, the verdict. A party that is silent or whose answer
    fails its check loses at once. Subclasses check answers (`_check_digests`, `_check_tensors`), keep
    what a round taught them (`_accept`), decide what to ask next or settle (`_plan`, `_ask`, `_finish`)."""

    def __init__(self):
        self._question: Question | None = None
        self._answers: dict[str, Answer | None] = {}
        self._rounds = self._bytes = 0
        self._verdict = None

    def next_question(self) -> Question | None:
        """The question both parties must answer now, or None once the dispute is settled."""
        return None if self._verdict is not None else self._question

    def answer(self, party: str, answer: Answer) -> None:
        """Record `party`'s answer to the current question."""
        self._receive(party, answer)

    def forfeit(self, party: str) -> None:
        """Record that `party` gave no answer in time (it loses)."""
        self._receive(party, None)

    def verdict(self):
        """The outcome; only once next_question() has returned None."""
        if self._verdict is None:
            raise RuntimeError("the dispute is not settled yet")
        return self._verdict

    def _receive(self, party: str, answer: Answer | None) -> None:
        if party not in PARTIES:
            raise ValueError(f"unknown party {party!r}")
        if self._question is None or self._verdict is not None:
            raise RuntimeError("no question is open")
        if party in self._answers:
            raise RuntimeError(f"party {party} already answered round {self._question.round}")
        self._answers[party] = answer
        if len(self._answers) == len(PARTIES):
            self._close_round()

    def _close_round(self) -> None:
        question, answers = self._question, self._answers
        self._question, self._answers = None, {}
        failures: dict[str, str] = {}
        for party in PARTIES:
            answer = answers[party]
            if answer is None:
                failures[party] = "silent"
                continue
            self._bytes += answer.size()
            check = self._check_tensors if question.tensors else self._check_digests
            if failure := check(party, question, answer):
                failures[party] = failure
        if failures:
            self._finish(failures)
            return
        self._accept(question, answers)
        self._plan()

    def _ask(self, refs: list[int], tensors: bool = False) -> None:
        self._rounds += 1
        self._bytes += QUESTION_REF_SIZE * len(refs) * len(PARTIES)
        self._question = Question(self._rounds, tuple(refs), tensors)

    def _check_digests(self, party: str, question: Question, answer: Answer) -> str | None:
        raise NotImplementedError

    def _check_tensors(self, party: str, question: Question, answer: Answer) -> str | None:
        raise NotImplementedError

    def _accept(self, question: Question, answers: dict[str, Answer]) -> None:
        raise NotImplementedError

    def _plan(self) -> None:
        raise NotImplementedError

    def _finish(self, failures: dict[str, str]) -> None:
        raise NotImplementedError


class Dispute(RoundReferee):
    """The referee's side of one dispute between parties "a" and "b"."""

    def __init__(
        self,
        a: SpanCommitment,
        b: SpanCommitment,
        span: LlamaSpan,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ):
        """`span` holds the referee's weights for (at least) the committed blocks; the mask and positions
        are the disputed forward's (public) ones, needed only to recompute attention."""
        if (a.start, a.end, a.num_leaves) != (b.start, b.end, b.num_leaves):
            raise ValueError("the commitments are to different spans")
        if not span.start <= a.start < a.end <= span.end:
            raise ValueError(f"the referee's span [{span.start}, {span.end}) lacks [{a.start}, {a.end})")
        if a.input_digest != b.input_digest:
            raise ValueError("the parties computed on different inputs")
        if a.block_output_digests[-1] == b.block_output_digests[-1]:
            raise ValueError("the parties agree on the span's output: nothing to dispute")
        super().__init__()
        self.commitments = {"a": a, "b": b}
        self._span, self._attention_mask, self._position_ids = span, attention_mask, position_ids
        # digests proven against each party's root, by ref; the span's input is agreed from the start
        self._known: dict[int, dict[str, bytes]] = {SPAN_INPUT: {"a": a.input_digest, "b": b.input_digest}}
        self._proofs: dict[str, dict[int, tuple[bytes, ...]]] = {party: {} for party in PARTIES}
        self._tensors: dict[int, torch.Tensor] | None = None
        # bisection over positions of the current sequence: lo agrees (-1: the sequence's input), hi differs
        self._phase = "blocks"
        self._lo, self._hi = -1, a.end - a.start - 1
        self._block: int | None = None
        self._op: int | None = None
        self._plan()

    def verdict(self) -> Verdict:
        """The outcome; only once next_question() has returned None."""
        return super().verdict()

    def _accept(self, question: Question, answers: dict[str, Answer]) -> None:
        if question.tensors:
            # both sets match the agreed digests, so either will do
            self._tensors = {ref: answers["a"].tensors[ref].contiguous() for ref in question.refs}
        else:
            for ref in question.refs:
                self._known[ref] = {party: answers[party].digests[ref] for party in PARTIES}
                for party in PARTIES:
                    self._proofs[party][ref] = answers[party].proofs.get(ref, ())

    def _check_digests(self, party: str, question: Question, answer: Answer) -> str | None:
        commitment = self.commitments[party]
        for ref in question.refs:
            digest = answer.digests.get(ref)
            if ref == SPAN_INPUT:
                if digest != commitment.input_digest:
                    return "contradiction"
                continue
            proof = answer.proofs.get(ref)
            if not isinstance(proof, (tuple, list)):
                return "bad_proof"
            if not verify_proof(commitment.operator_root, digest, ref, proof, commitment.num_leaves):
                return "bad_proof"
            block, op = divmod(ref, _OPS)
            if op == _BLOCK_OUTPUT and digest != commitment.block_output_digests[block]:
                return "contradiction"  # its tree and its list of block outputs disagree
        return None

    def _check_tensors(self, party: str, question: Question, answer: Answer) -> str | None:
        for ref in question.refs:
            tensor = answer.tensors.get(ref)
            if not isinstance(tensor, torch.Tensor) or tensor_digest(tensor) != self._known[ref][party]:
                return "bad_tensor"
        return None

    def _plan(self) -> None:
        """Advance as far as known digests allow, then open the next question (or settle)."""
        while self._verdict is None and self._question is None:
            if self._phase in ("blocks", "ops"):
                self._bisect()
            elif self._phase == "inputs":
                self._settle_inputs()
            elif self._tensors is None:
                inputs = OPERATOR_INPUTS[OPERATORS[self._op]]
                self._ask([self._input_ref(name) for name in inputs], tensors=True)
            else:
                self._judge()

    def _bisect(self) -> None:
        lo, hi = self._lo, self._hi
        mid = (lo + hi) // 2
        if hi - lo > 1 and self._ref_at(mid) not in self._known:
            wanted = [self._ref_at(mid)]
            # the span's last block output is only claimed to differ (by the output lists) until proven;
            # it rides along with the next question rather than costing a round of its own
            if self._ref_at(hi) not in self._known:
                wanted.append(self._ref_at(hi))
            self._ask(wanted)
        elif hi - lo > 1:
            if self._agree(self._ref_at(mid)):
                self._lo = mid
            else:
                self._hi = mid
        elif self._phase == "blocks":
            self._block, self._phase = hi, "ops"
            self._lo, self._hi = -1, _BLOCK_OUTPUT
        else:
            if self._agree(self._ref_at(hi)):
                raise RuntimeError("bisection ended on outputs that agree")  # the checks above forbid it
            self._op, self._phase = hi, "inputs"

    def _settle_inputs(self) -> None:
        wanted = [self._input_ref(name) for name in operator_ancestors(OPERATORS[self._op])]
        if wanted := [ref for ref in wanted if ref not in self._known]:
            self._ask(wanted)
            return
        # the candidate's output differs; while one of its inputs differs too, that input is the culprit
        while differing := [
            name for name in OPERATOR_INPUTS[OPERATORS[self._op]] if not self._agree(self._input_ref(name))
        ]:
            self._op = min(OPERATORS.index(name) for name in differing)
        self._phase = "fetch"

    def _judge(self) -> None:
        op = OPERATORS[self._op]
        block = self.commitments["a"].start + self._block
        names = OPERATOR_INPUTS[op]
        inputs = {name: self._tensors[self._input_ref(name)] for name in names}
        output = _recompute(self._span, block, op, inputs, self._attention_mask, self._position_ids)
        recomputed = tensor_digest(output)
        output_ref = self._block * _OPS + self._op
        claimed = {party: self._known[output_ref][party] for party in PARTIES}
        evidence = Evidence(
            num_leaves=self.commitments["a"].num_leaves,
            roots={party: self.commitments[party].operator_root for party in PARTIES},
            span_input_digest=self.commitments["a"].input_digest,
            input_refs={name: self._input_ref(name) for name in names},
            input_digests={name: self._known[self._input_ref(name)]["a"] for name in names},
            input_proofs={
                party: {
                    name: self._proofs[party][self._input_ref(name)]
                    for name in names
                    if self._input_ref(name) != SPAN_INPUT
                }
                for party in PARTIES
            },
            output_ref=output_ref,
            claimed_outputs=claimed,
            output_proofs={party: self._proofs[party][output_ref] for party in PARTIES},
            recomputed_output=recomputed,
            weight_digest=block_weight_digest(_layer(self._span, block)),
        )
        self._finish({party: "wrong_output" for party in PARTIES if claimed[party] != recomputed}, evidence)

    def _finish(self, failures: dict[str, str], evidence: Evidence | None = None) -> None:
        self._verdict = Verdict(
            losers=tuple(party for party in PARTIES if party in failures),
            reasons=failures,
            rounds=self._rounds,
            bytes_moved=self._bytes,
            first_block=self.commitments["a"].start,
            block=self._block,
            # before the fetch phase the operator is only a candidate
            op=OPERATORS[self._op] if self._phase == "fetch" else None,
            evidence=evidence,
        )

    def _ref_at(self, position: int) -> int:
        """The ref at `position` of the sequence being bisected: block outputs, or one block's operators."""
        if self._phase == "blocks":
            return position * _OPS + _BLOCK_OUTPUT
        return self._block * _OPS + position

    def _input_ref(self, name: str) -> int:
        return input_ref(self._block, name)

    def _agree(self, ref: int) -> bool:
        return self._known[ref]["a"] == self._known[ref]["b"]


def input_ref(block: int, name: str) -> int:
    """The ref of the tensor an operator of block `block` reads as `name` (an OPERATOR_INPUTS name)."""
    if name != BLOCK_INPUT:
        return operator_leaf(block, name)
    return SPAN_INPUT if block == 0 else (block - 1) * _OPS + _BLOCK_OUTPUT


def run_dispute(dispute: Dispute, parties: Mapping[str, Responder]) -> Verdict:
    """Play a dispute to the end with in-process parties; a None answer forfeits."""
    while (question := dispute.next_question()) is not None:
        for name in PARTIES:
            answer = parties[name].respond(question)
            if answer is None:
                dispute.forfeit(name)
            else:
                dispute.answer(name, answer)
    return dispute.verdict()


def recheck_verdict(
    verdict: Verdict,
    span: LlamaSpan,
    input_tensors: Mapping[str, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> bool:
    """Whether a verdict stands: the inputs are the committed ones, both outputs are as committed, and
    recomputing the operator with `span`'s weights convicts exactly the verdict's losers.

    `span` must hold the verdict's block (one block is enough); `input_tensors` maps the operator's input
    names (OPERATOR_INPUTS) to tensors. Only verdicts settled by recomputation carry evidence; the others
    (silence, bad proofs) rest on what the referee saw and raise ValueError.
    """
    evidence = verdict.evidence
    if evidence is None or verdict.block is None or verdict.op is None:
        raise ValueError("only a verdict settled by recomputing an operator can be re-checked")
    names = OPERATOR_INPUTS[verdict.op]
    refs = {name: input_ref(verdict.block, name) for name in names}
    # the evidence must be about this operator's own tensors, not leaves picked elsewhere in the trees
    if evidence.input_refs != refs or set(evidence.input_digests) != set(names):
        return False
    if evidence.output_ref != verdict.block * _OPS + OPERATORS.index(verdict.op):
        return False
    for name, digest in evidence.input_digests.items():
        if name not in input_tensors or tensor_digest(input_tensors[name]) != digest:
            return False
    for party in PARTIES:
        root = evidence.roots[party]
        for name, ref in evidence.input_refs.items():
            digest = evidence.input_digests[name]
            if ref == SPAN_INPUT:
                committed = digest == evidence.span_input_digest
            else:
                proof = evidence.input_proofs[party].get(name, ())
                committed = verify_proof(root, digest, ref, proof, evidence.num_leaves)
            if not committed:
                return False
        claimed, proof = evidence.claimed_outputs[party], evidence.output_proofs[party]
        if not verify_proof(root, claimed, evidence.output_ref, proof, evidence.num_leaves):
            return False
    layer = _layer(span, verdict.first_block + verdict.block)
    if block_weight_digest(layer) != evidence.weight_digest:
        return False
    inputs = {name: input_tensors[name].contiguous() for name in evidence.input_digests}
    block = verdict.first_block + verdict.block
    recomputed = tensor_digest(_recompute(span, block, verdict.op, inputs, attention_mask, position_ids))
    wrong = tuple(party for party in PARTIES if evidence.claimed_outputs[party] != recomputed)
    reasons_hold = all(verdict.reasons.get(party) == "wrong_output" for party in wrong)
    return bool(wrong) and wrong == verdict.losers and reasons_hold


def _layer(span: LlamaSpan, block: int) -> torch.nn.Module:
    if not span.start <= block < span.end:
        raise ValueError(f"block {block} is not in the span [{span.start}, {span.end})")
    return span.layers[block - span.start]


def _recompute(
    span: LlamaSpan,
    block: int,
    op: str,
    inputs: Mapping[str, torch.Tensor],
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> torch.Tensor:
    layer = _layer(span, block)
    context = None
    if op == "attention":
        q = inputs["q_proj"]
        placeholder = q.new_zeros(*q.shape[:-1], span.config.hidden_size)
        layer_type = span.layer_types[block - span.start]
        context = forward_context(span, placeholder, attention_mask, position_ids, layer_type)
    return recompute_operator(layer, op, inputs, context)
