"""The bisection game for a stage peer's gradient (Verde, applied to training).

A stage peer sends into its averaging round the mean weight gradient of the microbatches it ran backward on
(swarm.training.validation.Contribution). When a validator's recomputation disagrees, the two settle it here
instead of by a vote: each commits, with a Merkle root, to a trace of the whole contribution, one tensor per
leaf, in an order where every leaf is computed from earlier leaves and public data only:

    for each microbatch k:
        forward:  the output of each block b (its input: the previous block's output, or the microbatch's
                  inputs, which the trainer's receipt makes public)
        backward: for each block b from the last to the first, the gradient w.r.t. the block's input, then
                  the gradient of each of the block's weights (inputs: the block's forward input and the
                  gradient w.r.t. its output: the next block's input gradient, or the trainer's signed
                  grad_outputs)
        sums:     the running sum of each weight's gradient over microbatches 0..k
    the mean of each weight's gradient (the last sums over the samples): what the peer sent

The referee walks down both Merkle trees to the leftmost leaf where they differ (every leaf before it is
then agreed), fetches that leaf's inputs, recomputes it alone (one block's forward or backward for one
microbatch, or one addition or division) and convicts the party whose leaf differs from the recomputation.
A party that is silent, sends a proof that fails, or commits to a mean other than what it sent loses at
once. Rounds: at most ceil(log2 leaves) + 3; bytes: hashes, plus one block's activations or one weight's
gradient tensors.

Weights are the referee's own copy of the weights the microbatch ran with: the referee, the accused and the
accuser must all hold the group's weights of that step (swarm.training.validation.GroupValidation decides).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from swarm.models.span import LlamaSpan
from swarm.verification.dispute import PARTIES, Answer, Question, RoundReferee
from swarm.verification.merkle import MerkleTree, node_hashes, tensor_digest

FORWARD, INPUT_GRAD, PARAM_GRAD, SUM, MEAN = "forward", "input_grad", "param_grad", "sum", "mean"


@dataclass(frozen=True)
class LeafRole:
    """What one leaf of a gradient trace holds. `block` is an index within the span; `param` within the
    block's parameters (PARAM_GRAD) or within the span's (SUM, MEAN)."""

    kind: str
    microbatch: int | None = None
    block: int | None = None
    param: int | None = None


@dataclass(frozen=True)
class GradientLayout:
    """Where each tensor of a gradient trace sits among the leaves."""

    params_per_block: tuple[int, ...]
    microbatches: int

    @property
    def blocks(self) -> int:
        return len(self.params_per_block)

    @property
    def params(self) -> int:
        return sum(self.params_per_block)

    @property
    def per_microbatch(self) -> int:
        return 2 * self.blocks + 2 * self.params

    @property
    def num_leaves(self) -> int:
        return self.microbatches * self.per_microbatch + self.params

    def forward(self, k: int, block: int) -> int:
        return k * self.per_microbatch + block

    def input_grad(self, k: int, block: int) -> int:
        later = sum(1 + count for count in self.params_per_block[block + 1 :])
        return k * self.per_microbatch + self.blocks + later

    def param_grad(self, k: int, block: int, param: int) -> int:
        return self.input_grad(k, block) + 1 + param

    def sum(self, k: int, param: int) -> int:
        return k * self.per_microbatch + 2 * self.blocks + self.params + param

    def mean(self, param: int) -> int:
        return self.microbatches * self.per_microbatch + param

    def block_of(self, param: int) -> tuple[int, int]:
        """(block, index within the block) of the span's parameter `param`."""
        for block, count in enumerate(self.params_per_block):
            if param < count:
                return block, param
            param -= count
        raise IndexError("no such parameter")

    def span_param(self, block: int, param: int) -> int:
        return sum(self.params_per_block[:block]) + param

    def role(self, leaf: int) -> LeafRole:
        if not 0 <= leaf < self.num_leaves:
            raise IndexError(f"leaf {leaf} is outside a trace of {self.num_leaves}")
        k, offset = divmod(leaf, self.per_microbatch)
        if k == self.microbatches:
            return LeafRole(MEAN, param=offset)
        if offset < self.blocks:
            return LeafRole(FORWARD, k, offset)
        if offset < 2 * self.blocks + self.params:
            offset -= self.blocks
            for block in reversed(range(self.blocks)):
                if offset == 0:
                    return LeafRole(INPUT_GRAD, k, block)
                if offset <= self.params_per_block[block]:
                    return LeafRole(PARAM_GRAD, k, block, offset - 1)
                offset -= 1 + self.params_per_block[block]
        return LeafRole(SUM, k, param=offset - 2 * self.blocks - self.params)

    def dependencies(self, leaf: int) -> list[int]:
        """The leaves a leaf is computed from (public data, weights and the sample count aside)."""
        role = self.role(leaf)
        if role.kind == FORWARD:
            return [] if role.block == 0 else [self.forward(role.microbatch, role.block - 1)]
        if role.kind in (INPUT_GRAD, PARAM_GRAD):
            k, block = role.microbatch, role.block
            refs = [] if block == 0 else [self.forward(k, block - 1)]
            return refs + ([] if block == self.blocks - 1 else [self.input_grad(k, block + 1)])
        if role.kind == SUM:
            block, param = self.block_of(role.param)
            earlier = [] if role.microbatch == 0 else [self.sum(role.microbatch - 1, role.param)]
            return earlier + [self.param_grad(role.microbatch, block, param)]
        return [self.sum(self.microbatches - 1, role.param)]

    def to_dict(self) -> dict[str, Any]:
        return {"params_per_block": list(self.params_per_block), "microbatches": self.microbatches}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GradientLayout:
        layout = cls(tuple(int(n) for n in data["params_per_block"]), int(data["microbatches"]))
        if not layout.params_per_block or min(layout.params_per_block) < 1 or layout.microbatches < 1:
            raise ValueError("a layout needs blocks with parameters and at least one microbatch")
        return layout


@dataclass
class PublicData:
    """What every party and the referee share: the microbatches (made public by the trainers' signed
    receipts) and the sample count the mean divides by."""

    inputs: list[torch.Tensor]
    grad_outputs: list[torch.Tensor]
    samples: int


def block_params(span: LlamaSpan) -> list[list[torch.nn.Parameter]]:
    """Each block's parameters, in the order its gradients are traced (the span's own order)."""
    return [list(layer.parameters()) for layer in span.layers]


def layout_of(span: LlamaSpan, microbatches: int) -> GradientLayout:
    return GradientLayout(tuple(len(params) for params in block_params(span)), microbatches)


def _block(span: LlamaSpan, block: int) -> LlamaSpan:
    from swarm.verification.service import sub_span  # the service imports this module's users

    return sub_span(span, slice(block, block + 1))


def block_forward(span: LlamaSpan, block: int, hidden: torch.Tensor) -> torch.Tensor:
    """Block `block`'s output (no mask: training microbatches have none), bit for bit as in the span."""
    with torch.no_grad():
        return _block(span, block)(hidden)


def block_backward(
    span: LlamaSpan, block: int, hidden: torch.Tensor, grad_output: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(gradient w.r.t. the block's input, its weights' gradients): bit for bit what a backward through the
    whole span gives (every block's output feeds only the next block)."""
    view = _block(span, block)
    params = list(view.parameters())
    with torch.enable_grad():
        leaf = hidden.detach().requires_grad_(True)
        output = view(leaf)
        grads = torch.autograd.grad(output, [leaf, *params], grad_outputs=grad_output.to(output.dtype))
    return grads[0], list(grads[1:])


@contextlib.contextmanager
def weights_loaded(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor] | None) -> Iterator[None]:
    """`params` set to `values` (None: left as they are) for the duration, then restored."""
    if values is None:
        yield
        return
    current = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for param, value in zip(params, values, strict=True):
                param.copy_(value)
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(params, current, strict=True):
                param.copy_(value)


Corrupt = Callable[[tuple[torch.Tensor, ...], int], tuple[torch.Tensor, ...]]


def trace_gradient(
    span: LlamaSpan,
    public: PublicData,
    weights: Sequence[Sequence[torch.Tensor] | None],
    corrupt: Corrupt | None = None,
    steps: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Every leaf of the trace of a contribution, in leaf order.

    :param weights: per microbatch, the span's parameters (in `span.parameters()` order) it ran with; None
      keeps the span's current weights
    :param corrupt: what a faulty peer's backward does to (input grad, *weight grads) at `steps[k]`
      (swarm.testing.faults.Fault.corrupt_backward): its trace then shows what it really sent
    """
    layout = layout_of(span, len(public.inputs))
    groups = block_params(span)
    leaves: list[torch.Tensor | None] = [None] * layout.num_leaves
    sums: list[torch.Tensor] | None = None
    all_params = [p for group in groups for p in group]
    for k, (inputs, grad_outputs) in enumerate(zip(public.inputs, public.grad_outputs, strict=True)):
        with weights_loaded(all_params, weights[k]):
            hidden = [inputs.float()]
            for block in range(layout.blocks):
                hidden.append(block_forward(span, block, hidden[-1]))
                leaves[layout.forward(k, block)] = hidden[-1]
            grad, per_block = grad_outputs.float(), {}
            for block in reversed(range(layout.blocks)):
                grad, per_block[block] = block_backward(span, block, hidden[block], grad)
                per_block[block] = [grad, *per_block[block]]
        if corrupt is not None:
            flat = corrupt(
                (per_block[0][0], *(g for b in range(layout.blocks) for g in per_block[b][1:])), steps[k]
            )
            per_block[0][0], rest = flat[0], iter(flat[1:])
            for block in range(layout.blocks):
                per_block[block][1:] = [next(rest) for _ in range(layout.params_per_block[block])]
        for block in range(layout.blocks):
            leaves[layout.input_grad(k, block)] = per_block[block][0]
            for p, grad in enumerate(per_block[block][1:]):
                leaves[layout.param_grad(k, block, p)] = grad
        grads = [g for block in range(layout.blocks) for g in per_block[block][1:]]
        # as TrainableParameters.accumulate adds them: into zeros, in microbatch order
        sums = [torch.zeros_like(g) if sums is None else sums[i] for i, g in enumerate(grads)]
        sums = [total + grad for total, grad in zip(sums, grads, strict=True)]
        for i, total in enumerate(sums):
            leaves[layout.sum(k, i)] = total
    for i, total in enumerate(sums):
        leaves[layout.mean(i)] = total / max(public.samples, 1)
    return leaves


def recompute_leaf(
    span: LlamaSpan,
    layout: GradientLayout,
    leaf: int,
    inputs: dict[int, torch.Tensor],
    public: PublicData,
) -> torch.Tensor:
    """One leaf from its dependencies' tensors (`inputs`, by leaf), public data and `span`'s weights (set
    to those of the leaf's microbatch by the caller)."""
    role = layout.role(leaf)
    k = role.microbatch
    if role.kind in (FORWARD, INPUT_GRAD, PARAM_GRAD):
        hidden = public.inputs[k].float() if role.block == 0 else inputs[layout.forward(k, role.block - 1)]
    if role.kind == FORWARD:
        return block_forward(span, role.block, hidden)
    if role.kind in (INPUT_GRAD, PARAM_GRAD):
        last = role.block == layout.blocks - 1
        grad_output = public.grad_outputs[k].float() if last else inputs[layout.input_grad(k, role.block + 1)]
        grad_input, grads = block_backward(span, role.block, hidden, grad_output)
        return grad_input if role.kind == INPUT_GRAD else grads[role.param]
    if role.kind == SUM:
        block, param = layout.block_of(role.param)
        grad = inputs[layout.param_grad(k, block, param)]
        earlier = torch.zeros_like(grad) if k == 0 else inputs[layout.sum(k - 1, role.param)]
        return earlier + grad
    return inputs[layout.sum(layout.microbatches - 1, role.param)] / max(public.samples, 1)


@dataclass(frozen=True)
class GradientCommitment:
    """A party's commitment to its trace of one contribution."""

    step: int
    layout: GradientLayout
    root: bytes

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "layout": self.layout.to_dict(), "root": self.root.hex()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GradientCommitment:
        root = bytes.fromhex(data["root"])
        if len(root) != 32:
            raise ValueError("a root has 32 bytes")
        return cls(int(data["step"]), GradientLayout.from_dict(data["layout"]), root)


class GradientParty:
    """Answers a gradient dispute's questions from its trace (honestly: a fault may wrap `respond`)."""

    def __init__(self, step: int, layout: GradientLayout, leaves: Sequence[torch.Tensor]):
        if len(leaves) != layout.num_leaves:
            raise ValueError(f"a trace of this layout has {layout.num_leaves} leaves, got {len(leaves)}")
        self.leaves = [leaf.detach().contiguous() for leaf in leaves]
        self.tree = MerkleTree([tensor_digest(leaf) for leaf in self.leaves])
        self.commitment = GradientCommitment(step, layout, self.tree.root)

    @property
    def nbytes(self) -> int:
        return sum(leaf.numel() * leaf.element_size() for leaf in self.leaves)

    def respond(self, question: Question) -> Answer:
        if question.tensors:
            return Answer(tensors={ref: self.leaves[ref] for ref in question.refs})
        return Answer(
            digests={ref: self.tree.leaves[ref] for ref in question.refs},
            proofs={ref: self.tree.proof(ref) for ref in question.refs},
        )


@dataclass(frozen=True)
class GradientVerdict:
    """The outcome of a gradient dispute (`leaf`/`role`: the first leaf the parties disagreed on)."""

    losers: tuple[str, ...]
    reasons: dict[str, str]  # loser -> wrong_leaf | contradiction | silent | bad_proof | bad_tensor
    rounds: int
    bytes_moved: int
    leaf: int | None = None
    role: LeafRole | None = None


@dataclass
class _Party:
    commitment: GradientCommitment
    nodes: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (first, end) -> subtree hash
    digests: dict[int, bytes] = field(default_factory=dict)  # leaf -> digest, proven


class GradientDispute(RoundReferee):
    """The referee's side of one gradient dispute between "a" (the accused) and "b" (its accuser).

    :param sent_digests: tensor digests of the gradient "a" sent (checked against its signed commitment
      by the referee): "a" must commit to a mean that is exactly it, and "b" to another
    :param recompute: (leaf, its dependencies' tensors by leaf) -> the leaf, with the referee's weights
    """

    def __init__(
        self,
        a: GradientCommitment,
        b: GradientCommitment,
        sent_digests: Sequence[bytes],
        recompute: Callable[[int, dict[int, torch.Tensor]], torch.Tensor],
    ):
        if a.layout != b.layout or a.step != b.step:
            raise ValueError("the commitments are to different contributions")
        super().__init__()
        self.layout = a.layout
        if len(sent_digests) != self.layout.params:
            raise ValueError(f"{len(sent_digests)} sent tensors for a span of {self.layout.params} weights")
        self.sent_digests = list(sent_digests)
        self.recompute = recompute
        self._parties = {"a": _Party(a), "b": _Party(b)}
        for party in self._parties.values():
            party.nodes[(0, self.layout.num_leaves)] = party.commitment.root
        self._node = (0, self.layout.num_leaves)
        self._phase = "means"  # -> descend -> inputs -> tensors -> judged
        self._leaf: int | None = None
        self._tensors: dict[int, torch.Tensor] | None = None
        self._ask([self.layout.mean(i) for i in range(self.layout.params)])

    def verdict(self) -> GradientVerdict:
        return super().verdict()

    def _accept(self, question: Question, answers: dict[str, Answer]) -> None:
        if question.tensors:  # both sets match the agreed digests, so either will do
            self._tensors = {ref: answers["a"].tensors[ref] for ref in question.refs}

    def _check_digests(self, name: str, question: Question, answer: Answer) -> str | None:
        party = self._parties[name]
        num_leaves = self.layout.num_leaves
        for ref in question.refs:
            digest, proof = answer.digests.get(ref), answer.proofs.get(ref)
            if not isinstance(proof, (tuple, list)):
                return "bad_proof"
            nodes = node_hashes(party.commitment.root, digest, ref, proof, num_leaves)
            if nodes is None:
                return "bad_proof"
            party.nodes.update(nodes)
            party.digests[ref] = digest
        return None

    def _check_tensors(self, name: str, question: Question, answer: Answer) -> str | None:
        for ref in question.refs:
            tensor = answer.tensors.get(ref)
            if not isinstance(tensor, torch.Tensor) or tensor_digest(tensor) != self._digest(name, ref):
                return "bad_tensor"
        return None

    def _plan(self) -> None:
        while self._verdict is None and self._question is None:
            if self._phase == "means":
                self._judge_means()
            elif self._phase == "descend":
                self._descend()
            elif self._phase == "inputs":
                deps = self.layout.dependencies(self._leaf)
                if missing := [ref for ref in deps if ref not in self._parties["a"].digests]:
                    self._ask(missing)
                elif deps and self._tensors is None:
                    self._ask(deps, tensors=True)
                else:
                    self._judge()

    def _judge_means(self) -> None:
        """The accused must have committed to what it sent; the accuser, to something else."""
        means = [self.layout.mean(i) for i in range(self.layout.params)]
        failures = {}
        if [self._digest("a", ref) for ref in means] != self.sent_digests:
            failures["a"] = "contradiction"  # its trace does not end in the gradient it sent
        if [self._digest("b", ref) for ref in means] == self.sent_digests:
            failures["b"] = "contradiction"  # it agrees with what it accused
        if failures:
            self._finish(failures)
        else:
            self._phase = "descend"

    def _descend(self) -> None:
        """Down to the leftmost leaf where the trees differ, using every hash the proofs revealed."""
        a, b = self._parties["a"], self._parties["b"]
        first, end = self._node
        while end - first > 1:
            middle = first + _split(end - first)
            left = (first, middle)
            if left not in a.nodes or left not in b.nodes:
                self._ask([first])  # its proof reveals the left spine below this node
                self._node = (first, end)
                return
            first, end = left if a.nodes[left] != b.nodes[left] else (middle, end)
        if first not in a.digests or first not in b.digests:
            self._node = (first, end)
            self._ask([first])
            return
        self._leaf, self._phase = first, "inputs"

    def _judge(self) -> None:
        leaf = self._leaf
        recomputed = tensor_digest(self.recompute(leaf, self._tensors or {}))
        failures = {name: "wrong_leaf" for name in PARTIES if self._digest(name, leaf) != recomputed}
        self._finish(failures)

    def _finish(self, failures: dict[str, str]) -> None:
        self._verdict = GradientVerdict(
            losers=tuple(name for name in PARTIES if name in failures),
            reasons=failures,
            rounds=self._rounds,
            bytes_moved=self._bytes,
            leaf=self._leaf,
            role=None if self._leaf is None else self.layout.role(self._leaf),
        )

    def _digest(self, name: str, ref: int) -> bytes | None:
        return self._parties[name].digests.get(ref)


def _split(n: int) -> int:
    return 1 << ((n - 1).bit_length() - 1)


def describe(verdict: GradientVerdict, layout: GradientLayout, first_block: int, names: Sequence[str]) -> str:
    """Where a verdict pinned the disagreement (`names`: the span's parameters), for logs and ban reasons."""
    role = verdict.role
    if role is None:
        return "before any leaf was disputed"
    if role.kind == FORWARD:
        what = "the forward output"
    elif role.kind == INPUT_GRAD:
        what = "the input gradient"
    elif role.kind == PARAM_GRAD:
        what = f"the gradient of {names[layout.span_param(role.block, role.param)]}"
    else:
        what = f"the {'running sum' if role.kind == SUM else 'mean'} of {names[role.param]}'s gradient"
    where = [] if role.microbatch is None else [f"microbatch {role.microbatch}"]
    where += [] if role.block is None else [f"block {first_block + role.block}"]
    return f"{what} ({', '.join(where)})" if where else what
