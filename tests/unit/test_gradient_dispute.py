"""The bisection game over a stage peer's gradient (swarm.verification.gradient_dispute), in process."""

from __future__ import annotations

import math
import random

import pytest
import torch

from swarm.models.span import LlamaSpan
from swarm.models.tiny import tiny_llama_config
from swarm.training.trainable import TrainableParameters
from swarm.verification.determinism import deterministic_profile
from swarm.verification.dispute import Answer
from swarm.verification.gradient_dispute import (
    FORWARD,
    INPUT_GRAD,
    MEAN,
    PARAM_GRAD,
    SUM,
    GradientDispute,
    GradientParty,
    PublicData,
    describe,
    layout_of,
    recompute_leaf,
    trace_gradient,
    weights_loaded,
)
from swarm.verification.merkle import MerkleTree, node_hashes, tensor_digest

BLOCKS, MICROBATCHES, STEP = 3, 3, 5


@pytest.fixture(scope="module", autouse=True)
def deterministic():
    with deterministic_profile():
        yield


def _span() -> LlamaSpan:
    torch.manual_seed(0)
    span = LlamaSpan(tiny_llama_config(num_blocks=BLOCKS + 1), 1, BLOCKS + 1)
    return span.train().requires_grad_(True)


@pytest.fixture(scope="module")
def span() -> LlamaSpan:
    return _span()


@pytest.fixture(scope="module")
def public(span) -> PublicData:
    generator = torch.Generator().manual_seed(1)
    hidden = span.config.hidden_size
    shapes = [(2, 5, hidden), (1, 7, hidden), (3, 4, hidden)]
    inputs = [torch.randn(*shape, generator=generator) for shape in shapes]
    grads = [torch.randn(*shape, generator=generator) for shape in shapes]
    return PublicData(inputs, grads, samples=sum(shape[0] for shape in shapes))


@pytest.fixture(scope="module")
def weights(span) -> list[list[torch.Tensor]]:
    """Microbatch 0 ran with the previous step's weights, the others with this step's (the current)."""
    current = [p.detach().clone() for p in span.parameters()]
    previous = [p + 1e-3 * torch.randn_like(p) for p in current]
    return [previous, current, current]


def _party(span, public, weights, corrupt=None) -> GradientParty:
    steps = [STEP - 1, STEP, STEP]
    leaves = trace_gradient(span, public, weights, corrupt=corrupt, steps=steps)
    return GradientParty(STEP, layout_of(span, len(public.inputs)), leaves)


@pytest.fixture(scope="module")
def honest(span, public, weights) -> GradientParty:
    return _party(span, public, weights)


def _referee(span, public, weights, a: GradientParty, b: GradientParty, sent: list[torch.Tensor]):
    layout = a.commitment.layout
    params = list(span.parameters())

    def recompute(leaf, inputs):
        k = layout.role(leaf).microbatch
        with weights_loaded(params, None if k is None else weights[k]):
            return recompute_leaf(span, layout, leaf, inputs, public)

    return GradientDispute(a.commitment, b.commitment, [tensor_digest(t) for t in sent], recompute)


def _play(dispute, parties):
    while (question := dispute.next_question()) is not None:
        for name, party in parties.items():
            answer = party.respond(question)
            if answer is None:
                dispute.forfeit(name)
            else:
                dispute.answer(name, answer)
    return dispute.verdict()


def _means(party: GradientParty) -> list[torch.Tensor]:
    layout = party.commitment.layout
    return [party.leaves[layout.mean(i)] for i in range(layout.params)]


def _zeros(grads, step):
    return tuple(torch.zeros_like(g) for g in grads)


def test_leaves_have_one_place_and_depend_only_on_earlier_leaves(span):
    layout = layout_of(span, MICROBATCHES)
    seen = set()
    for leaf in range(layout.num_leaves):
        role = layout.role(leaf)
        place = {
            FORWARD: lambda r: layout.forward(r.microbatch, r.block),
            INPUT_GRAD: lambda r: layout.input_grad(r.microbatch, r.block),
            PARAM_GRAD: lambda r: layout.param_grad(r.microbatch, r.block, r.param),
            SUM: lambda r: layout.sum(r.microbatch, r.param),
            MEAN: lambda r: layout.mean(r.param),
        }[role.kind](role)
        assert place == leaf
        seen.add(role)
        assert all(dep < leaf for dep in layout.dependencies(leaf))
    assert len(seen) == layout.num_leaves
    with pytest.raises(IndexError):
        layout.role(layout.num_leaves)


def test_the_trace_ends_in_the_gradient_a_stage_sends_bit_for_bit(span, public, weights, honest):
    """The mean leaves equal what TrainableParameters accumulates from whole-span backward passes."""
    trainable = TrainableParameters(list(span.named_parameters()), 1e-3, (0.9, 0.99), 1e-8, 0.0, 0.0)
    params = trainable.params
    for k, (inputs, grads) in enumerate(zip(public.inputs, public.grad_outputs, strict=True)):
        with weights_loaded(params, weights[k]), torch.enable_grad():
            hidden = inputs.clone().requires_grad_(True)
            out = span(hidden)
            computed = torch.autograd.grad(out, [hidden, *params], grad_outputs=grads)
        trainable.accumulate(computed[1:], inputs.shape[0])
    sent, samples = trainable.take_mean_gradients()
    assert samples == public.samples
    means = _means(honest)
    assert len(means) == len(sent) and all(torch.equal(m, s) for m, s in zip(means, sent, strict=True))
    again = _party(span, public, weights)
    assert again.commitment == honest.commitment


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 40])
def test_a_proof_reveals_the_hashes_of_its_path_and_siblings(n):
    leaves = [bytes([i]) * 32 for i in range(n)]
    tree = MerkleTree(leaves)
    for index in range(n):
        nodes = node_hashes(tree.root, leaves[index], index, tree.proof(index), n)
        assert nodes is not None and nodes[(0, n)] == tree.root
        assert all(tree._subtree(first, end) == value for (first, end), value in nodes.items())
        assert node_hashes(tree.root, leaves[(index + 1) % n], index, tree.proof(index), n) is None or n == 1
        assert node_hashes(tree.root, leaves[index], index, tree.proof(index)[:-1], n) is None or n == 1


def test_a_lazy_peer_loses_at_its_first_wrong_weight_gradient(span, public, weights, honest):
    lazy = _party(span, public, weights, corrupt=_zeros)
    dispute = _referee(span, public, weights, lazy, honest, _means(lazy))
    verdict = _play(dispute, {"a": lazy, "b": honest})
    assert verdict.losers == ("a",) and verdict.reasons == {"a": "wrong_leaf"}
    layout = honest.commitment.layout
    # its forward is honest; its backward of the last block in microbatch 0 is the first that differs
    assert verdict.role.kind in (PARAM_GRAD, INPUT_GRAD)
    assert (verdict.role.microbatch, verdict.role.block) == (0, BLOCKS - 1)
    assert verdict.rounds <= math.ceil(math.log2(layout.num_leaves)) + 3
    names = [name for name, _ in span.named_parameters()]
    assert "microbatch 0, block 3" in describe(verdict, layout, span.start, names)


def test_a_cheater_that_flips_one_microbatch_loses_there(span, public, weights, honest):
    def flip_last(grads, step):
        return grads if step != STEP else tuple(-g for g in grads)

    cheater = _party(span, public, weights, corrupt=flip_last)
    verdict = _play(
        _referee(span, public, weights, cheater, honest, _means(cheater)), {"a": cheater, "b": honest}
    )
    assert verdict.losers == ("a",) and verdict.role.microbatch == 1


def test_a_false_accuser_loses(span, public, weights, honest):
    """An accuser whose recomputation used other weights (one weight 0.1% off) is wrong where it starts."""
    bent = [list(w) for w in weights]
    bent[1] = [w.clone() for w in weights[1]]
    bent[1][len(bent[1]) // 2].mul_(1.001)
    accuser = _party(span, public, bent)
    verdict = _play(
        _referee(span, public, weights, honest, accuser, _means(honest)), {"a": honest, "b": accuser}
    )
    assert verdict.losers == ("b",) and verdict.reasons == {"b": "wrong_leaf"}
    assert verdict.role.microbatch == 1


def test_committing_to_another_gradient_than_the_one_sent_loses(span, public, weights, honest):
    lazy = _party(span, public, weights, corrupt=_zeros)
    # the accused sent zeros but committed to the honest trace: its trace contradicts what it sent
    verdict = _play(_referee(span, public, weights, honest, lazy, _means(lazy)), {"a": honest, "b": lazy})
    assert verdict.losers == ("a", "b") and verdict.reasons["a"] == "contradiction"
    # an accuser whose trace ends in what was sent has nothing to accuse
    verdict = _play(
        _referee(span, public, weights, honest, honest, _means(honest)), {"a": honest, "b": honest}
    )
    assert verdict.losers == ("b",) and verdict.reasons == {"b": "contradiction"}
    assert verdict.rounds == 1


class _Liar:
    def __init__(self, party: GradientParty, from_round: int, silent: bool = False):
        self.party, self.from_round, self.silent = party, from_round, silent

    def respond(self, question):
        answer = self.party.respond(question)
        if question.round < self.from_round:
            return answer
        if self.silent:
            return None
        if question.tensors:
            return Answer(tensors={ref: t + 1 for ref, t in answer.tensors.items()})
        return Answer(digests={ref: bytes(32) for ref in answer.digests}, proofs=answer.proofs)


@pytest.mark.parametrize("from_round", [1, 2, 4])
@pytest.mark.parametrize("silent", [False, True])
def test_a_liar_or_a_silent_party_loses_the_round_it_fails(span, public, weights, honest, from_round, silent):
    lazy = _party(span, public, weights, corrupt=_zeros)
    liar = _Liar(lazy, from_round, silent)
    verdict = _play(_referee(span, public, weights, lazy, honest, _means(lazy)), {"a": liar, "b": honest})
    assert verdict.losers == ("a",)
    assert verdict.reasons["a"] in (("silent",) if silent else ("bad_proof", "bad_tensor", "wrong_leaf"))
    # the honest party, lying the same way, loses too: the game is symmetric
    liar = _Liar(honest, from_round, silent)
    verdict = _play(_referee(span, public, weights, lazy, honest, _means(lazy)), {"a": lazy, "b": liar})
    assert "b" in verdict.losers


def test_random_single_leaf_lies_are_pinned_to_that_leaf(span, public, weights, honest):
    """A party whose trace differs from the honest one in one leaf only loses at exactly that leaf."""
    layout = honest.commitment.layout
    rng = random.Random(0)
    for leaf in rng.sample(range(layout.num_leaves - layout.params), 6):
        leaves = list(honest.leaves)
        leaves[leaf] = leaves[leaf] + 1
        liar = GradientParty(STEP, layout, leaves)
        verdict = _play(
            _referee(span, public, weights, honest, liar, _means(honest)), {"a": honest, "b": liar}
        )
        # its mean is the honest one: nothing to accuse, unless the lie is in the trace only
        assert verdict.losers == ("b",)
        assert verdict.reasons["b"] == "contradiction"
        mean_liar = list(leaves)
        mean_liar[layout.mean(0)] = mean_liar[layout.mean(0)] + 1
        liar = GradientParty(STEP, layout, mean_liar)
        verdict = _play(
            _referee(span, public, weights, honest, liar, _means(honest)), {"a": honest, "b": liar}
        )
        assert verdict.losers == ("b",) and verdict.leaf == leaf, (leaf, verdict)
