"""Faults for testing defences: every attack or cheat a node or trainer can be told to commit, one registry.

Off unless named: `swarm node ... --fault byzantine:sign_flip:start=3`, `swarm node --blocks 0:4 --fault
perturb:block=2` or `swarm train ... --fault ...`.
A fault is a set of hooks the honest code calls at fixed points; the honest path never checks names.
Listed under a "testing" heading in `--help`.

The hooks (`Fault`'s defaults are honest: each returns its input) and where the honest code calls them:

- `corrupt_gradients(grads, step)`: on the gradients a member sends, before its group's averaging round.
  Used by sign_flip, random_direction, delayed, ipm and alie.
- `corrupt_labels(labels, step, vocab_size)`: on the labels of the trainer's loss. Used by label_flip
  (its gradients are then honest for the flipped labels).
- `tamper_part(part, chunk, step)`: in the all-reduce sender, on each part it sends, after it committed
  to its gradients. Used by equivocate (its commitment covers the honest bytes, the part sent differs).
- `tamper_aggregate(aggregate, chunk, step)`: in the all-reduce reducer, on each aggregate it computed,
  before it signs the result. Used by bad_reducer.
- `corrupt_backward(grads, step)`: on what a training node's backward computed for one microbatch (its
  input gradient, then its weight gradients), before it replies and adds them to its sums. Used by
  lazy_backward (zeros: the work skipped).
- `prepare_span(span)`: on the span a serving node loaded, before it serves it. Used by perturb (a hook on
  one operator of one block; refereed verification must pin the lie to that block and operator).
- `answer_dispute(answer)`: on each answer a serving node gives in a dispute about its trace. Used by
  lie_in_dispute and silent_in_dispute.
- `on_serving(node)`: once a serving node serves (handlers registered, announced ONLINE), with a
  `ServingNode`; a coroutine it returns runs in the node's event loop until it ends or the node stops. Used
  by frame (it publishes a false verdict against an honest peer: swarm.verification.framing).

Every byzantine attack is active only from step `start` on (default 0). A fault's `roles` say which
processes can commit it; `swarm node` refuses a fault that its kind of node would never call.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, fields
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

from swarm.verification.operators import OPERATORS

if TYPE_CHECKING:  # the CLI builds --help from this module: keep torch out of its import
    import torch
    from hivemind.dht import DHT
    from hivemind.p2p import P2P
    from hivemind.utils.crypto import RSAPrivateKey

    from swarm.models.span import LlamaSpan
    from swarm.node.backend import SpanBackend
    from swarm.verification.dispute import Answer

ATTACK_SEED = 1234  # shared by colluding attackers (e.g. random_direction's direction)

# who calls which hooks: `swarm node --train` and `swarm train` (gradients, labels, all-reduce), and a
# serving `swarm node` (its span)
TRAINING_NODE, TRAINER, SERVING_NODE = "training node", "trainer", "serving node"


class FaultError(ValueError):
    """A --fault value that names no fault or has bad arguments."""


@dataclass(frozen=True)
class ServingNode:
    """What a serving node hands `Fault.on_serving` once it serves: its identity, its connections and the
    span it serves now (`backend()`: the node may move to other blocks later)."""

    peer_id: str
    model: str  # the model's name in the DHT (what records and signed statements name)
    num_blocks: int  # the model's
    dht: DHT
    p2p: P2P
    signing_key: RSAPrivateKey  # the node's identity key: its DHT records and signed statements use it
    owner_public_key: bytes  # the DHT signer's public key, which owns this node's subkeys
    backend: Callable[[], SpanBackend]
    determinism: dict[str, str]  # the profile the node announces


class Fault:
    """Hooks with honest defaults; a fault overrides the ones it corrupts."""

    name = ""
    roles: frozenset[str] = frozenset()  # the processes whose honest code calls the hooks this fault uses

    def corrupt_gradients(self, grads: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        """The gradients this member sends to its group's averaging round at `step`."""
        return grads

    def corrupt_labels(self, labels: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
        """The labels a trainer computes its loss on at `step` (negative values are ignore-indices)."""
        return labels

    def tamper_part(self, part: torch.Tensor, chunk: int, step: int) -> torch.Tensor:
        """The bytes an all-reduce sender sends for `chunk` at `step`, after committing to its gradients."""
        return part

    def tamper_aggregate(self, aggregate: torch.Tensor, chunk: int, step: int) -> torch.Tensor:
        """The aggregate an all-reduce reducer computed for `chunk` at `step`, before signing it."""
        return aggregate

    def corrupt_backward(self, grads: tuple[torch.Tensor, ...], step: int) -> tuple[torch.Tensor, ...]:
        """What a training node's backward at `step` returns (input gradient) and accumulates (weights')."""
        return grads

    def prepare_span(self, span: LlamaSpan) -> None:
        """Called on each span a serving node loads, before it serves it; may hook the span's modules."""

    def answer_dispute(self, answer: Answer) -> Answer | None:
        """What a serving node answers to a round of a dispute about its trace; None: it stays silent."""
        return answer

    def on_serving(self, node: ServingNode) -> Coroutine[Any, Any, Any] | None:
        """Called once a serving node serves; a coroutine returned runs in the node's event loop (cancelled
        when the node stops). Honest nodes do nothing more."""
        return None


class CombinedFault(Fault):
    """Several faults at once (`--fault A --fault B`): each hook applies them in the order given."""

    def __init__(self, faults: list[Fault]):
        self.faults = faults
        self.name = "+".join(fault.name for fault in faults)
        self.roles = frozenset.intersection(*(fault.roles for fault in faults))

    def corrupt_gradients(self, grads, step):
        for fault in self.faults:
            grads = fault.corrupt_gradients(grads, step)
        return grads

    def corrupt_labels(self, labels, step, vocab_size):
        for fault in self.faults:
            labels = fault.corrupt_labels(labels, step, vocab_size)
        return labels

    def tamper_part(self, part, chunk, step):
        for fault in self.faults:
            part = fault.tamper_part(part, chunk, step)
        return part

    def tamper_aggregate(self, aggregate, chunk, step):
        for fault in self.faults:
            aggregate = fault.tamper_aggregate(aggregate, chunk, step)
        return aggregate

    def corrupt_backward(self, grads, step):
        for fault in self.faults:
            grads = fault.corrupt_backward(grads, step)
        return grads

    def prepare_span(self, span):
        for fault in self.faults:
            fault.prepare_span(span)

    def answer_dispute(self, answer):
        for fault in self.faults:
            if answer is None:
                return None
            answer = fault.answer_dispute(answer)
        return answer

    def on_serving(self, node):
        work = [coroutine for fault in self.faults if (coroutine := fault.on_serving(node)) is not None]
        if not work:
            return None
        return work[0] if len(work) == 1 else _together(work)


async def _together(coroutines: list[Coroutine]) -> list:
    """Run several faults' background work at once."""
    return await asyncio.gather(*coroutines)


def alie_z(n: int, b: int) -> float:
    """ALIE's z for `n` peers of which `b` attack: s = floor(n/2 + 1) - b, z = Phi^-1((n - s) / n)."""
    s = math.floor(n / 2 + 1) - b
    if not 0 < (n - s) / n < 1:
        raise FaultError(f"alie needs 0 <= b < n/2 + 1 and n > 1 (got n={n}, b={b})")
    return NormalDist().inv_cdf((n - s) / n)


@dataclass
class ByzantineGradients(Fault):
    """Commits one of BTARD's attacks from step `start` on (see ATTACKS for what each does).

    :param n, b: alie's swarm size and attacker count, which set its z (see `alie_z`)
    :param scale: bad_reducer's perturbation norm, relative to the aggregate's norm
    """

    attack: str
    start: int = 0
    n: int = 16
    b: int = 7
    scale: float = 0.05
    history: list[list[torch.Tensor]] = field(default_factory=list)  # own gradients, newest last
    name = "byzantine"
    roles = frozenset({TRAINING_NODE, TRAINER})

    @property
    def z(self) -> float:
        return alie_z(self.n, self.b)

    def corrupt_gradients(self, grads: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        kept = HISTORY_KEPT.get(self.attack, 0)
        if kept:
            self.history.append([g.clone() for g in grads])
            del self.history[: max(len(self.history) - kept, 0)]
        if step < self.start:
            return grads
        return ATTACKS[self.attack][0](grads, self)

    def corrupt_labels(self, labels: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
        if self.attack != "label_flip" or step < self.start:
            return labels
        import torch

        return torch.where(labels >= 0, vocab_size - 1 - labels, labels)

    def tamper_part(self, part: torch.Tensor, chunk: int, step: int) -> torch.Tensor:
        if self.attack != "equivocate" or step < self.start:
            return part
        return part * -1000.0

    def tamper_aggregate(self, aggregate: torch.Tensor, chunk: int, step: int) -> torch.Tensor:
        if self.attack != "bad_reducer" or step < self.start or aggregate.numel() == 0:
            return aggregate
        import torch

        generator = torch.Generator().manual_seed(ATTACK_SEED + chunk + step)
        direction = torch.randn(aggregate.shape, generator=generator, dtype=torch.float64)
        norm = float(torch.linalg.vector_norm(aggregate.double()))
        target = self.scale * (norm if norm > 0 else 1.0)
        noise = direction * (target / float(torch.linalg.vector_norm(direction)))
        return (aggregate.double() + noise.to(aggregate.device)).to(aggregate.dtype)


DELAY_KEPT = 1000  # `delayed` sends the gradient from this many steps ago, or the oldest kept
ALIE_KEPT = 8  # `alie` estimates the honest mean and std from this many of its own latest gradients
HISTORY_KEPT = {"delayed": DELAY_KEPT, "alie": ALIE_KEPT}  # the others keep no history


def _honest(grads, fault):
    return grads


def _sign_flip(grads, fault):
    return [g * -1000.0 for g in grads]


def _random_direction(grads, fault):
    import torch

    generator = torch.Generator().manual_seed(ATTACK_SEED)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))  # noqa: F821 (imported above)
    direction = [torch.randn(g.shape, generator=generator) for g in grads]
    scale = 1000.0 * norm / torch.sqrt(sum((d.double() ** 2).sum() for d in direction)).clamp_min(1e-30)
    return [(d * scale).to(g.dtype) for d, g in zip(direction, grads, strict=True)]


def _delayed(grads, fault):
    return [g.clone() for g in fault.history[0]]


def _ipm(grads, fault):
    # inner-product manipulation with the attacker's own gradient as its estimate of the honest mean
    return [g * -0.1 for g in grads]


def _alie(grads, fault):
    """mean - z * std, coordinate-wise, over this member's own last (up to) ALIE_KEPT gradients.

    A real attacker cannot see the honest gradients, so it estimates their mean and std from its own
    recent ones (population std); with one gradient kept the std is 0 and it sends that gradient.
    """
    import torch

    z = fault.z
    sent = []
    for i, g in enumerate(grads):
        stacked = torch.stack([kept[i].double() for kept in fault.history])
        mean, std = stacked.mean(dim=0), stacked.std(dim=0, correction=0)
        sent.append((mean - z * std).to(g.dtype))
    return sent


# name -> (what it does to the gradients it sends, its options beyond start, its help)
ATTACKS: dict[str, tuple[Callable, dict[str, type], str]] = {
    "sign_flip": (_sign_flip, {}, "sends -1000 x its gradient"),
    "random_direction": (_random_direction, {}, "sends a shared random direction of 1000 x its norm"),
    "delayed": (_delayed, {}, f"sends its oldest kept gradient, up to {DELAY_KEPT} steps old"),
    "ipm": (_ipm, {}, "sends -0.1 x its gradient"),
    "label_flip": (_honest, {}, "trains on labels vocab-1-label"),
    "alie": (
        _alie,
        {"n": int, "b": int},
        f"sends mean - z std of its own last {ALIE_KEPT} gradients, z for n peers of which b attack",
    ),
    "equivocate": (_honest, {}, "commits to its gradient but sends -1000 x it"),
    "bad_reducer": (_honest, {"scale": float}, "as a reducer, adds noise of scale x the norm to aggregates"),
}


def _parse_byzantine(args: list[str]) -> Fault:
    if not args or args[0] not in ATTACKS:
        raise FaultError(f"byzantine needs an attack: one of {', '.join(ATTACKS)}")
    attack = args[0]
    types = {"start": int, **ATTACKS[attack][1]}
    options = _options(args[1:], set(types), f"byzantine:{attack}")
    values = {}
    for key, text in options.items():
        try:
            values[key] = types[key](text)
        except ValueError:
            kind = "an integer" if types[key] is int else "a number"
            raise FaultError(f"byzantine:{attack} option {key}={text!r} is not {kind}") from None
    fault = ByzantineGradients(attack, **values)
    if fault.start < 0:
        raise FaultError(f"byzantine:{attack} needs start >= 0 (got {fault.start})")
    if attack == "alie":
        alie_z(fault.n, fault.b)  # raises FaultError for an n, b that give no z
    if attack == "bad_reducer" and not (math.isfinite(fault.scale) and fault.scale >= 0):
        raise FaultError(f"byzantine:bad_reducer needs a finite scale >= 0 (got {fault.scale})")
    return fault


def _options(args: list[str], allowed: set[str], where: str) -> dict[str, str]:
    options = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in allowed:
            raise FaultError(
                f"unknown option {arg!r} for {where} (expected KEY=VALUE with KEY one of {sorted(allowed)})"
            )
        options[key] = value
    return options


@dataclass
class PerturbOperator(Fault):
    """A serving node that moves every element of operator `op`'s output in (absolute) block `block` by
    `ulps` units in the last place: about the smallest lie that still reaches its replies (see
    swarm.verification.trace.perturb_operator). Everything after it in the span computes on the moved values.
    """

    block: int
    op: str = "down_proj"
    ulps: int = 1
    handles: list = field(default_factory=list, repr=False)  # the hooks, one per span prepared
    name = "perturb"
    roles = frozenset({SERVING_NODE})

    def prepare_span(self, span: LlamaSpan) -> None:
        if not span.start <= self.block < span.end:
            raise FaultError(
                f"--fault perturb:block={self.block}: block {self.block} is outside this node's span "
                f"[{span.start}, {span.end})"
            )
        from swarm.verification.trace import perturb_operator

        self.handles.append(perturb_operator(span, self.block - span.start, self.op, self.ulps))


def _parse_perturb(args: list[str]) -> Fault:
    # `perturb:block=2,op=q_proj,ulp=3`; ":" separates options too, as for byzantine
    options = _options([part for arg in args for part in arg.split(",")], {"block", "op", "ulp"}, "perturb")
    if "block" not in options:
        raise FaultError("perturb needs block=K: the (absolute) block whose operator it perturbs")
    values = {}
    for key in ("block", "ulp"):
        if key in options:
            try:
                values[key] = int(options[key])
            except ValueError:
                raise FaultError(f"perturb option {key}={options[key]!r} is not an integer") from None
    if values["block"] < 0:
        raise FaultError(f"perturb needs block >= 0 (got {values['block']})")
    op = options.get("op", PerturbOperator.op)
    if op not in OPERATORS:
        raise FaultError(f"perturb: unknown operator op={op!r}; expected one of {', '.join(OPERATORS)}")
    ulps = values.get("ulp", PerturbOperator.ulps)
    if ulps <= 0:
        raise FaultError(f"perturb needs ulp >= 1 (got {ulps})")
    return PerturbOperator(values["block"], op, ulps)


class LieInDispute(Fault):
    """A node that answers every dispute round (about a forward it served, or a training node about its
    gradient) with digests other than the ones it committed to (each digest's bits flipped, the proofs
    unchanged) and tensors other than the ones it traced (+1), as a cheater might try to steer the
    bisection."""

    name = "lie_in_dispute"
    roles = frozenset({SERVING_NODE, TRAINING_NODE})

    def answer_dispute(self, answer: Answer) -> Answer | None:
        digests = {ref: bytes(byte ^ 0xFF for byte in digest) for ref, digest in answer.digests.items()}
        tensors = {ref: tensor + 1 for ref, tensor in answer.tensors.items()}
        return dataclasses.replace(answer, digests=digests, tensors=tensors)


class SilentInDispute(Fault):
    """A node that never answers a dispute round (the referee's timeout makes it forfeit)."""

    name = "silent_in_dispute"
    roles = frozenset({SERVING_NODE, TRAINING_NODE})

    def answer_dispute(self, answer: Answer) -> Answer | None:
        return None


@dataclass
class Frame(Fault):
    """A serving node that, once it serves, publishes a false verdict convicting an honest peer that serves
    blocks overlapping its own: the victim's real signed commitment, a dispute this node referees between it
    and a lie of its own (block `block`'s down_proj off by an ulp), and a record that names the victim as the
    loser (swarm.verification.framing). Every client that re-checks the record bans this node instead.

    :param block: the (absolute) block the false claim is about; None: the first block of the common span
    """

    block: int | None = None
    name = "frame"
    roles = frozenset({SERVING_NODE})

    def on_serving(self, node: ServingNode) -> Coroutine[Any, Any, Any]:
        from swarm.verification.framing import frame_a_peer

        return frame_a_peer(node, self.block)


def _parse_frame(args: list[str]) -> Fault:
    # `frame` or `frame:block=K`
    options = _options([part for arg in args for part in arg.split(",")], {"block"}, "frame")
    if "block" not in options:
        return Frame()
    try:
        block = int(options["block"])
    except ValueError:
        raise FaultError(f"frame option block={options['block']!r} is not an integer") from None
    if block < 0:
        raise FaultError(f"frame needs block >= 0 (got {block})")
    return Frame(block)


class LazyBackward(Fault):
    """A training node that skips its backward's work: it replies with a zero input gradient and adds
    zero weight gradients to its sums (gradient validation finds its sent gradient off the recomputation).
    """

    name = "lazy_backward"
    roles = frozenset({TRAINING_NODE})

    def corrupt_backward(self, grads: tuple[torch.Tensor, ...], step: int) -> tuple[torch.Tensor, ...]:
        import torch

        return tuple(torch.zeros_like(g) for g in grads)


class NanOutput(Fault):
    """A serving node whose span outputs NaN (a broken kernel, a bad quantization): a client must ban it,
    not the next node that refuses the NaN it would pass on."""

    name = "nan_output"
    roles = frozenset({SERVING_NODE})

    def prepare_span(self, span: LlamaSpan) -> None:
        def poison(module, args, output):
            return output * float("nan")

        span.layers[-1].register_forward_hook(poison)


class RefuseRequests(Fault):
    """A serving node that calls every forward, backward and inference step malformed (BAD_REQUEST): a
    client must not take its word for it when another node serves the same request."""

    name = "refuse_requests"
    roles = frozenset({SERVING_NODE})

    def prepare_span(self, span: LlamaSpan) -> None:
        from swarm.node.errors import RequestError
        from swarm.proto import swarm_pb2

        def refuse(module, args):
            raise RequestError(swarm_pb2.Error.BAD_REQUEST, "refused by the refuse_requests fault")

        span.layers[0].register_forward_pre_hook(refuse)


def _no_arguments(fault_type: type[Fault]) -> Callable[[list[str]], Fault]:
    def parse(args: list[str]) -> Fault:
        if args:
            raise FaultError(f"{fault_type.name} takes no arguments (got {':'.join(args)!r})")
        return fault_type()

    return parse


_DEFAULTS = {f.name: f.default for f in fields(ByzantineGradients)}

# name -> (help, parser of the ":"-separated arguments); no "%" in help (argparse formats it)
FAULTS: dict[str, tuple[str, Callable[[list[str]], Fault]]] = {
    "byzantine": (
        "byzantine:ATTACK[:KEY=VALUE...] attacks training from step start=STEP on (default 0); "
        "ATTACK is one of: "
        + ", ".join(
            f"{name}{''.join(f'[:{key}={_DEFAULTS[key]}]' for key in options)} ({description})"
            for name, (_, options, description) in ATTACKS.items()
        ),
        _parse_byzantine,
    ),
    "perturb": (
        f"perturb:block=K[,op={PerturbOperator.op}][,ulp={PerturbOperator.ulps}] (serving nodes) moves every "
        "element of operator op's output in block K by ulp units in the last place; op is one of: "
        + ", ".join(OPERATORS),
        _parse_perturb,
    ),
    "lie_in_dispute": (
        "lie_in_dispute (serving and training nodes) answers disputes with digests other than the "
        "committed ones",
        _no_arguments(LieInDispute),
    ),
    "silent_in_dispute": (
        "silent_in_dispute (serving and training nodes) never answers a dispute round, so it forfeits",
        _no_arguments(SilentInDispute),
    ),
    "frame": (
        "frame[:block=K] (serving nodes) once serving, publishes a false verdict that convicts an honest "
        "peer serving overlapping blocks of a lie in block K (default: the first block they share); "
        "clients re-check it and ban this node instead",
        _parse_frame,
    ),
    "lazy_backward": (
        "lazy_backward (training nodes) skips its backward's work: zero input and weight gradients",
        _no_arguments(LazyBackward),
    ),
    "nan_output": (
        "nan_output (serving nodes) replies with NaN hidden states",
        _no_arguments(NanOutput),
    ),
    "refuse_requests": (
        "refuse_requests (serving nodes) answers every forward, backward and inference step with "
        "BAD_REQUEST, as if the client's request were malformed",
        _no_arguments(RefuseRequests),
    ),
}


def parse_fault(text: str) -> Fault:
    """`NAME[:ARG[:ARG...]]` -> the fault; FaultError names what is wrong."""
    name, *args = text.split(":")
    if name not in FAULTS:
        raise FaultError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
    return FAULTS[name][1](args)


def fault_for(texts: str | list[str], role: str) -> Fault:
    """The fault(s) `texts` name, for a process of kind `role` (several are combined, in order);
    FaultError if that kind never triggers one of them."""
    faults = []
    for text in [texts] if isinstance(texts, str) else texts:
        fault = parse_fault(text)
        if role not in fault.roles:
            where = " and ".join(sorted(f"{r}s" for r in fault.roles))
            raise FaultError(f"--fault {text} applies to {where} only, not to a {role}")
        faults.append(fault)
    if not faults:
        raise FaultError("no fault named")
    return faults[0] if len(faults) == 1 else CombinedFault(faults)


def add_fault_argument(parser: argparse.ArgumentParser) -> None:
    """`--fault NAME[:ARGS]` under a "testing" heading (off unless named; repeat it for several)."""

    def fault(text: str) -> str:
        try:
            parse_fault(text)
        except FaultError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    group = parser.add_argument_group(
        "testing", "attacks and cheats for testing defences; never use in a real run"
    )
    group.add_argument(
        "--fault",
        type=fault,
        action="append",
        default=None,
        metavar="NAME[:ARGS]",
        help="; ".join(help_text for help_text, _ in FAULTS.values()),
    )
