"""BTARD's gradient validation: a stage peer's gradient is recomputed by another member of its round.

A stage peer can send any gradient it likes into an averaging round; CenteredClip bounds the damage but
bans nobody. Validation makes a wrong gradient provable:

- trainers sign a receipt for every backward call they make (the digests of the inputs and output
  gradients they send, `sign_receipt`); a stage peer refuses a backward call without a valid one, so
  every microbatch behind its gradient is one a trainer really sent;
- a stage peer keeps, for its last few rounds, the microbatches (with receipts and the step of the weights
  that computed them), the gradient it sent, and its weights (`ContributionLog`), and shows them on
  request (`rpc_train_contribution`);
- after each round, the round's random seed (which no single member chose) pairs validators with the
  members they check (`choose_pairs`); a validator fetches its target's contribution, checks the gradient
  against the target's signed commitment and every receipt, recomputes the mean gradient with its own copy
  of the weights of those steps and compares (`GradientValidator`). A mismatch beyond `VALIDATION_RTOL`
  is a "bad_gradient" accusation;
- every member of the accused's group that judges the accusation settles it and publishes its signed
  verdict: in a stage, by refereeing the bisection game between the accuser and the accused
  (swarm.training.disputes: one block's forward or backward of one microbatch recomputed), or by
  recomputing the whole gradient when the game can't be played (a trainer's head gradient always); peers
  without the group's weights (trainers for a stage, stage peers for a trainer, `swarm run status`) follow
  the majority of the verdicts of the group's other members, those of the round and those live in the
  group now.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Protocol  # noqa: UP035 (hivemind recognises streams by typing.AsyncIterator only)

import torch
from hivemind.p2p import P2P
from hivemind.utils.crypto import RSAPrivateKey

from swarm.averaging.accusations import BAD_GRADIENT, GOOD_FAITH, make_accusation
from swarm.averaging.btard import file_accusation
from swarm.averaging.commitments import chunk_digests
from swarm.averaging.statements import InvalidStatement, digest, expect, open_statement, sign_statement
from swarm.proto import swarm_pb2
from swarm.protocol import STREAM_CHUNK_BYTES, TrainStateProtocol
from swarm.utils.streaming import TensorAssembler, batch_parts, split_tensors
from swarm.utils.tensors import FLOAT_DTYPES, INDEX_DTYPES, deserialize_checked, serialize

logger = logging.getLogger(__name__)

RECEIPT_KIND = "microbatch"
VERDICT_KIND = "gradient_verdict"
VERDICT_TAG = "gverdict"
# relative L2 distance allowed between a sent gradient and its recomputation. Members' weights differ by a
# few ulps of all-reduce rounding, which moves an honest gradient by about 1e-6 of its norm; the attacks
# move it by more than its norm
VALIDATION_RTOL = 1e-3
KEEP_STEPS = 4  # rounds whose contributions (and weights) a stage peer keeps for validators and judges
# steps a member may hold past that window for validations and accusations in flight (memory: at most
# twice the window's weights). Under load rounds can outrun the checks, and an accusation of a step whose
# weights its judges dropped can never be judged: its author would escape
MAX_HELD_STEPS = KEEP_STEPS
# how long a round's steps stay past the window (if the budget allows) for validations of it still to
# accuse: a judge learns of an accusation only when it is filed
ROUND_HOLD_SECONDS = 120.0
# how long the parties of an accusation hold its steps: other judges ask them for traces of it
ACCUSATION_HOLD_SECONDS = 600.0
MAX_CONTRIBUTION_BYTES = 4 * 1024**3  # a validator buffers a contribution whole
WIRE_DTYPES = {**FLOAT_DTYPES, **INDEX_DTYPES}


class CannotJudge(RuntimeError):
    """This peer lacks what a recomputation needs (e.g. the weights of that step): no verdict either way."""


class NotOurGroup(CannotJudge):
    """The accusation is about another group's round: this peer is none of its judges."""


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """sha256 of a tensor's dtype, shape and bytes."""
    tensor = tensor.detach().contiguous().cpu()
    hasher = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return hasher.digest()


def receipt_payload(run_hash: str, stage: int, inputs: torch.Tensor, grad_outputs: torch.Tensor) -> dict:
    return {
        "kind": RECEIPT_KIND,
        "run": run_hash,
        "stage": int(stage),
        "inputs": tensor_digest(inputs),
        "grad_outputs": tensor_digest(grad_outputs),
    }


def sign_receipt(
    key: RSAPrivateKey, run_hash: str, stage: int, inputs: torch.Tensor, grad_outputs: torch.Tensor
) -> bytes:
    """A trainer's signed statement that it sent these tensors to a backward of `stage`."""
    return sign_statement(key, receipt_payload(run_hash, stage, inputs, grad_outputs))


def check_receipt(
    blob: bytes,
    run_hash: str,
    stage: int,
    inputs: torch.Tensor,
    grad_outputs: torch.Tensor,
    signer: str | None = None,
) -> str:
    """The receipt's signer, if it covers exactly these tensors (signed by `signer` when given).

    :raises InvalidStatement: otherwise
    """
    who, payload = open_statement(blob)
    if signer is not None and who != signer:
        raise InvalidStatement(f"the receipt is signed by {who}, not by the caller {signer}")
    if payload != receipt_payload(run_hash, stage, inputs, grad_outputs):
        raise InvalidStatement("the receipt does not cover these tensors of this run's stage")
    return who


REPLY_KIND = "reply"


def reply_payload(run_hash: str, stage: int, call: str, inputs: torch.Tensor, output: torch.Tensor) -> dict:
    return {
        "kind": REPLY_KIND,
        "run": run_hash,
        "stage": int(stage),
        "call": call,
        "inputs": tensor_digest(inputs),
        "output": tensor_digest(output),
    }


def sign_reply(
    key: RSAPrivateKey, run_hash: str, stage: int, call: str, inputs: torch.Tensor, output: torch.Tensor
) -> bytes:
    """A stage peer's signed statement that its `call` ("forward" or "backward") on `inputs` returned
    `output` (a trainer shows it to prove where the activations or gradients behind its own came from)."""
    return sign_statement(key, reply_payload(run_hash, stage, call, inputs, output))


def check_reply(blob: bytes, run_hash: str, stage: int, call: str, output: torch.Tensor) -> str:
    """The signer of a stage peer's reply receipt, if it is for `call` of `stage` and returned `output`.

    :raises InvalidStatement: otherwise
    """
    who, payload = open_statement(blob)
    expected = {"kind": REPLY_KIND, "run": run_hash, "stage": int(stage), "call": call}
    if any(payload.get(name) != value for name, value in expected.items()):
        raise InvalidStatement(f"not a receipt for a {call} of stage {stage} of this run")
    if payload.get("output") != tensor_digest(output):
        raise InvalidStatement(f"the {call} receipt of stage {stage} is for another output")
    return who


# what a microbatch of each kind holds: its tensors and how many receipts
STAGE_MICROBATCH = "stage"  # a stage peer's backward: {inputs, grad_outputs}, [the trainer's receipt]
HEAD_MICROBATCH = "head"  # a trainer's loss: {ids, hidden}, [the last stage's forward receipt]
EMBED_MICROBATCH = "embed"  # a trainer's embeddings: {ids, grad}, [the first stage's backward receipt]
MICROBATCH_LAYOUT = {
    STAGE_MICROBATCH: (("inputs", "grad_outputs"), 1),
    HEAD_MICROBATCH: (("ids", "hidden"), 1),
    EMBED_MICROBATCH: (("ids", "grad"), 1),
}


@dataclass
class Microbatch:
    """One piece of work behind a participant's gradient, with the signed receipts that show its inputs
    are not made up, and the step of the weights that computed it."""

    kind: str
    tensors: dict[str, torch.Tensor]
    receipts: list[bytes]
    weights_step: int


@dataclass
class Contribution:
    """A stage peer's share of one round: the gradient it sent and the microbatches it came from."""

    step: int
    sent: list[torch.Tensor]
    microbatches: list[Microbatch]


class ContributionLog:
    """What a stage peer keeps so that validators can recompute its gradient of its last `keep` rounds, and
    of older ones that validations or accusations still need (`hold`, `hold_round`; at most `max_held`
    steps past the window).

    `add` (every backward) and `close` (when the round's gradient is taken) run on the compute thread;
    `record_sent` when the gradient is handed to the averager; `snapshot` whenever the weights change.
    """

    def __init__(
        self,
        keep: int = KEEP_STEPS,
        max_held: int = MAX_HELD_STEPS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.keep, self.max_held, self._clock = keep, max_held, clock
        self._lock = threading.Lock()
        self._open: list[Microbatch] = []
        self._closed: dict[int, list[Microbatch]] = {}
        self._sent: dict[int, list[torch.Tensor]] = {}
        self._weights: dict[int, list[torch.Tensor]] = {}
        self._holds: dict[str, tuple[frozenset[int], float]] = {}  # key -> (steps, until): never evicted
        self._recent: dict[int, float] = {}  # round step -> until: kept while the budget allows

    def add(self, microbatch: Microbatch) -> None:
        with self._lock:
            self._open.append(microbatch)

    def close(self, step: int) -> None:
        """The microbatches so far make up the gradient of round `step`."""
        with self._lock:
            self._closed[step], self._open = self._open, []
            self._forget(self._closed)

    def record_sent(self, step: int, tensors: Sequence[torch.Tensor]) -> None:
        with self._lock:
            self._sent[step] = [t.detach().cpu().clone() for t in tensors]
            self._forget(self._sent)

    def snapshot(self, step: int, params: Sequence[torch.Tensor]) -> None:
        """Keep a copy of the weights at `step` (the weights microbatches of that step ran with)."""
        copies = [p.detach().clone() for p in params]
        with self._lock:
            self._weights[step] = copies
            self._forget(self._weights)

    def restart(self, step: int, params: Sequence[torch.Tensor]) -> None:
        """This member took another's state (weights at `step`; its gradient sums were dropped): forget the
        microbatches not yet in a round (their gradients are gone) and the kept weights (its earlier ones
        may not be the group's, and recomputing with them could accuse an honest peer), except those of
        step 0: the run's checkpoint, every member's. Its contributions to past rounds stay: they are what
        it did, and validators may still ask for them."""
        copies = [p.detach().clone() for p in params]
        with self._lock:
            # a member that resyncs at step 1 under load (its parameters differed from the group's) must
            # still judge accusations of step 0: it was then the only judge of a lazy peer's first round
            checkpoint = {0: self._weights[0]} if 0 in self._weights else {}
            self._open, self._weights = [], {**checkpoint, step: copies}

    def hold(self, key: str, steps: Iterable[int], seconds: float) -> bool:
        """Keep the weights and contributions of `steps` past the window until `release(key)`, or for
        `seconds` (a validation or an accusation needs them). Holding `key` again changes nothing.

        :returns: False, holding nothing, when that would hold more than `max_held` steps: a flood of
            accusations must not pin unbounded weights
        :raises ValueError: `seconds` is not positive (nothing is held)
        """
        if not seconds > 0:
            raise ValueError(f"a hold lasts a positive number of seconds, not {seconds}")
        steps = frozenset(int(s) for s in steps)
        with self._lock:
            self._expire()
            if key in self._holds:
                return True
            held = frozenset().union(*(s for s, _ in self._holds.values()))
            if len(held | steps) > self.max_held:
                return False
            self._holds[key] = (steps, self._clock() + seconds)
            return True

    def release(self, key: str) -> None:
        """Stop holding what `hold(key, ...)` held (dropped with the next round, if past the window)."""
        with self._lock:
            self._holds.pop(key, None)

    def hold_round(self, step: int, seconds: float = ROUND_HOLD_SECONDS) -> None:
        """Keep round `step` (its contribution, and the weights of `step` - 1 and `step`) past the window for
        `seconds`, as far as `max_held` allows beside the holds: validations of it may still accuse."""
        with self._lock:
            self._recent[int(step)] = self._clock() + seconds

    def holds(self, key: str) -> bool:
        """Whether `hold(key, ...)` still holds its steps (not released, not expired)."""
        with self._lock:
            self._expire()
            return key in self._holds

    def held(self) -> set[int]:
        """The steps held for validations and accusations (by `hold`)."""
        with self._lock:
            self._expire()
            return set().union(*(s for s, _ in self._holds.values()))

    def weights(self, step: int) -> list[torch.Tensor] | None:
        with self._lock:
            return self._weights.get(step)

    def latest_round(self) -> int | None:
        """The last round this member took its gradient for (None before its first)."""
        with self._lock:
            return max(self._closed, default=None)

    def get(self, step: int) -> Contribution | None:
        with self._lock:
            if step not in self._sent or step not in self._closed:
                return None
            return Contribution(step, self._sent[step], list(self._closed[step]))

    def _expire(self) -> None:
        now = self._clock()
        self._holds = {k: v for k, v in self._holds.items() if v[1] > now}
        self._recent = {s: until for s, until in self._recent.items() if until > now}

    def _forget(self, by_step: dict) -> None:
        """Drop what is past the window: all but what `hold` holds and, newest first while fewer than
        `max_held` are kept, the steps of recent rounds."""
        self._expire()
        held = set().union(*(s for s, _ in self._holds.values()))
        old = sorted(by_step)[: -self.keep]
        kept = {s for s in old if s in held}
        recent = {s for r in self._recent for s in (r - 1, r)}
        for step in reversed(old):
            if len(kept) >= self.max_held:
                break
            if step in recent:
                kept.add(step)
        for step in old:
            if step not in kept:
                del by_step[step]


def recompute_mean_gradient(
    params: Sequence[torch.Tensor],
    microbatches: Sequence[Microbatch],
    weights: dict[int, list[torch.Tensor]],
    gradients_of: Callable[[Microbatch], tuple[list[torch.Tensor], int]],
) -> list[torch.Tensor]:
    """The mean gradient of another member's microbatches: each microbatch's (param gradients, samples)
    from `gradients_of`, computed with `params` set to the weights of its step and summed in its order (as
    the member summed them). `params` are restored afterwards."""
    current = [p.detach().clone() for p in params]
    sums = [torch.zeros_like(p) for p in params]
    samples, loaded = 0, None
    try:
        for microbatch in microbatches:
            if microbatch.weights_step != loaded:
                with torch.no_grad():
                    for param, value in zip(params, weights[microbatch.weights_step], strict=True):
                        param.copy_(value)
                loaded = microbatch.weights_step
            grads, count = gradients_of(microbatch)
            for total, grad in zip(sums, grads, strict=True):
                total.add_(grad)
            samples += count
    finally:
        with torch.no_grad():
            for param, value in zip(params, current, strict=True):
                param.copy_(value)
    return [total / max(samples, 1) for total in sums]


def choose_pairs(seed: bytes, members: Sequence[str], validators: int) -> list[tuple[str, str]]:
    """(validator, target) pairs of a round: the members in an order drawn from the round's seed, each of
    the first `validators` checking the next one (a cycle, so nobody checks itself)."""
    order = sorted(members)
    if len(order) < 2 or validators <= 0:
        return []
    random.Random(seed).shuffle(order)
    count = min(validators, len(order))
    return [(order[i], order[(i + 1) % len(order)]) for i in range(count)]


def relative_error(sent: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """||sent - expected|| / max(||sent||, ||expected||) over all tensors (0 when both are zero)."""
    diff = sum(float((s.double() - e.double()).square().sum()) for s, e in zip(sent, expected, strict=True))
    norm = max(
        sum(float(s.double().square().sum()) for s in sent),
        sum(float(e.double().square().sum()) for e in expected),
    )
    return (diff / norm) ** 0.5 if norm > 0 else (0.0 if diff == 0 else float("inf"))


# ---- on the wire -----------------------------------------------------------------------------------------


async def stream_contribution(contribution: Contribution | None) -> AsyncIterator:
    """TrainContributionResponse messages for `contribution` (None: not kept)."""
    if contribution is None:
        yield swarm_pb2.TrainContributionResponse(found=False)
        return
    names = [f"sent{i}" for i in range(len(contribution.sent))]
    tensors = list(contribution.sent)
    for k, microbatch in enumerate(contribution.microbatches):
        for name, tensor in microbatch.tensors.items():
            names.append(f"mb{k}.{name}")
            tensors.append(tensor)
    microbatches = contribution.microbatches
    yield swarm_pb2.TrainContributionResponse(
        found=True,
        step=contribution.step,
        names=names,
        kinds=[m.kind for m in microbatches],
        receipts=[receipt for m in microbatches for receipt in m.receipts],
        receipt_counts=[len(m.receipts) for m in microbatches],
        weight_steps=[m.weights_step for m in microbatches],
    )
    for batch in batch_parts(
        split_tensors([serialize(t) for t in tensors], STREAM_CHUNK_BYTES), STREAM_CHUNK_BYTES
    ):
        yield swarm_pb2.TrainContributionResponse(tensors=batch)


class ContributionUnavailable(RuntimeError):
    """The peer did not answer, or answered with an error."""


def _parse_contribution(header, protos: list, num_sent: int) -> Contribution:
    """Rebuild a contribution from its header and tensors; raises ValueError if anything is off."""
    count = len(header.kinds)
    if len(header.receipt_counts) != count or len(header.weight_steps) != count:
        raise ValueError("the microbatches' kinds, receipts and steps do not line up")
    expected = [f"sent{i}" for i in range(num_sent)]
    for k, kind in enumerate(header.kinds):
        if kind not in MICROBATCH_LAYOUT:
            raise ValueError(f"unknown microbatch kind {kind!r}")
        names, receipts = MICROBATCH_LAYOUT[kind]
        if header.receipt_counts[k] != receipts:
            raise ValueError(f"a {kind} microbatch carries {receipts} receipts")
        expected += [f"mb{k}.{name}" for name in names]
    if list(header.names) != expected or len(protos) != len(expected):
        raise ValueError("the tensors are not the ones the microbatches name")
    if sum(header.receipt_counts) != len(header.receipts):
        raise ValueError("the receipts do not add up")
    tensors = [
        deserialize_checked(
            p, name=n, allowed_dtypes=WIRE_DTYPES, ndim=None, max_bytes=MAX_CONTRIBUTION_BYTES
        )
        for n, p in zip(expected, protos, strict=True)
    ]
    sent, rest, receipts = tensors[:num_sent], iter(tensors[num_sent:]), iter(header.receipts)
    microbatches = []
    for k, kind in enumerate(header.kinds):
        names, count_receipts = MICROBATCH_LAYOUT[kind]
        microbatches.append(
            Microbatch(
                kind,
                {name: next(rest) for name in names},
                [bytes(next(receipts)) for _ in range(count_receipts)],
                int(header.weight_steps[k]),
            )
        )
    return Contribution(int(header.step), sent, microbatches)


async def fetch_contribution(
    p2p: P2P, peer_id: str, run_hash: str, step: int, num_sent: int, timeout: float, prefix: str = ""
) -> Contribution | None:
    """A participant's contribution to round `step` of the stage `prefix` (None: it says it kept none).

    :raises ContributionUnavailable: no answer in time, an error reply, or a malformed one
    :raises CannotJudge: it trains another stage now, and its rounds of this one are gone with it
    """

    async def collect():
        stub = TrainStateProtocol.stub(p2p, peer_id)
        request = swarm_pb2.TrainContributionRequest(run_hash=run_hash, step=step, prefix=prefix)
        header, assembler = None, TensorAssembler(MAX_CONTRIBUTION_BYTES)
        async with aclosing(await stub.rpc_train_contribution(request)) as stream:  # closed here first
            async for response in stream:
                if response.HasField("error"):
                    if response.error.code == swarm_pb2.Error.UNKNOWN_BLOCKS:
                        raise CannotJudge(f"{peer_id} moved to another stage: {response.error.message}")
                    raise ContributionUnavailable(f"{peer_id} refused: {response.error.message}")
                header = header or response
                assembler.extend(response.tensors)
                if not header.found or assembler.has(len(header.names)):
                    break
        return header, assembler

    try:
        header, assembler = await asyncio.wait_for(collect(), timeout)
    except (ContributionUnavailable, CannotJudge):
        raise
    except Exception as e:
        raise ContributionUnavailable(f"{peer_id} did not answer: {e!r}") from e
    if header is None:
        raise ContributionUnavailable(f"{peer_id} sent nothing")
    if not header.found:
        return None
    try:
        return _parse_contribution(header, assembler.finish(), num_sent)
    except Exception as e:
        raise ContributionUnavailable(f"{peer_id} sent a malformed contribution: {e}") from e


# ---- recomputing -----------------------------------------------------------------------------------------


class Recomputer(Protocol):
    """What a validator needs from the participant it runs in: a stage's backend, or a trainer."""

    log: ContributionLog

    def gradient_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of the tensors a member of its group averages."""

    def check_microbatch(self, microbatch: Microbatch) -> None:
        """Raise InvalidStatement unless the microbatch's receipts show where its tensors came from."""

    async def recompute(
        self, microbatches: list[Microbatch], weights: dict[int, list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        """The mean gradient of another member's microbatches, each with the weights of its step."""


class GradientValidator:
    """Recomputes other members' gradients from their contributions, with this member's weights.

    :param owner: the stage backend or trainer this validator runs in
    :param prefix: the group's averaging prefix (commitments name it)
    :param part_size_bytes: the robust rounds' chunk size (commitments hash chunks of that size)
    """

    def __init__(
        self,
        owner: Recomputer,
        p2p: P2P,
        run_hash: str,
        prefix: str,
        part_size_bytes: int,
        timeout: float = 60.0,
    ):
        self.owner, self.p2p, self.run_hash = owner, p2p, run_hash
        self.prefix, self.part_size_bytes, self.timeout = prefix, part_size_bytes, timeout
        # (peer, step) -> why this member's weights of `step` may not be the peer's (None: they are the
        # group's for both); GroupValidation sets it from the rounds both took part in
        self.same_weights: Callable[[str, int], str | None] | None = None
        # judging an accusation: (accused, accuser, contribution, weights by step) -> (guilty, why), settled
        # by the bisection game (swarm.training.disputes), or None when it could not be played
        self.referee: Callable[..., Awaitable[tuple[str | None, str] | None]] | None = None

    async def check(
        self, peer: str, step: int, commit: bytes, accuser: str | None = None
    ) -> tuple[str | None, str]:
        """(peer, why) if its round-`step` gradient is proven wrong, (None, why) if it checks out.

        Judging `accuser`'s accusation, with a `referee`: the two play the bisection game and this member
        recomputes one leaf of it; the whole gradient only when the game can't be played.

        :raises ContributionUnavailable: the peer could not be reached (try again later)
        :raises CannotJudge: this member lacks the weights the recomputation needs
        """
        try:
            committed = expect(commit, signer=peer, kind="commit", prefix=self.prefix, step=step)["chunks"]
        except (InvalidStatement, KeyError) as e:
            raise CannotJudge(f"no valid commitment of {peer} for step {step}: {e}") from e
        shapes = self.owner.gradient_shapes()
        contribution = await fetch_contribution(
            self.p2p, peer, self.run_hash, step, len(shapes), self.timeout, self.prefix
        )
        if contribution is None:
            latest = self.owner.log.latest_round()
            # a peer keeps its last KEEP_STEPS rounds and may be a round ahead of this one: asked later than
            # that, "kept none" is the rule working, not proof
            if latest is not None and latest - step > KEEP_STEPS - 2:
                raise CannotJudge(
                    f"asked {peer} for its contribution to step {step} at step {latest}: too late, peers "
                    f"keep only their last {KEEP_STEPS} rounds"
                )
            return peer, f"kept no contribution to step {step} it committed to"
        if [tuple(t.shape) for t in contribution.sent] != shapes:
            return peer, f"showed a gradient of step {step} with the wrong shapes"
        if chunk_digests(contribution.sent, self.part_size_bytes) != committed:
            return peer, f"showed a gradient of step {step} other than the one it committed to"
        for k, microbatch in enumerate(contribution.microbatches):
            try:
                self.owner.check_microbatch(microbatch)
            except (InvalidStatement, ValueError) as e:
                return peer, f"microbatch {k} of step {step} does not check out: {e}"
            if microbatch.weights_step not in (step - 1, step):
                return peer, f"microbatch {k} of step {step} claims weights of step {microbatch.weights_step}"
        needed = sorted({m.weights_step for m in contribution.microbatches})
        if self.same_weights is not None:
            for weights_step in needed:
                if (reason := self.same_weights(peer, weights_step)) is not None:
                    raise CannotJudge(reason)
        weights = {s: self.owner.log.weights(s) for s in needed}
        missing = [s for s, w in weights.items() if w is None]
        if missing:
            raise CannotJudge(f"this peer no longer holds the weights of step(s) {missing}")
        if accuser is not None and self.referee is not None and self._shares_weights(accuser, needed):
            if (settled := await self.referee(peer, accuser, contribution, weights)) is not None:
                return settled
        try:
            expected = await self.owner.recompute(contribution.microbatches, weights)
        except Exception as e:  # check_microbatch vetted the inputs: a failure here is ours, not proof
            raise CannotJudge(f"recomputing {peer}'s gradient of step {step} failed: {e!r}") from e
        error = relative_error(contribution.sent, expected)
        if error > VALIDATION_RTOL:
            return peer, (
                f"its gradient of step {step} ({len(contribution.microbatches)} microbatches) differs from "
                f"the recomputation by {error:.2e} of its norm"
            )
        return None, f"its gradient of step {step} matches the recomputation ({error:.1e} of its norm)"

    def _shares_weights(self, peer: str, steps: Sequence[int]) -> bool:
        """Whether `peer` holds this member's weights of every step in `steps` (so its trace can match)."""
        return self.same_weights is None or all(self.same_weights(peer, s) is None for s in steps)


# a verdict's "guilty" when its signer can't judge the accusation (it lacks the weights of its steps, say)
CANNOT_JUDGE = "cannot judge"


def verdict_statement(key: RSAPrivateKey, accusation: str, guilty: str) -> bytes:
    """A stage peer's signed verdict on a "bad_gradient" accusation (hex digest), for members that can't
    recompute it themselves: the guilty peer, or CANNOT_JUDGE."""
    return sign_statement(key, {"kind": VERDICT_KIND, "accusation": accusation, "guilty": guilty})


def majority_verdict(
    accusation: dict, verdicts: dict[str, bytes], voters: set[str]
) -> tuple[str | None, str] | None:
    """The verdict of the majority of the `voters` (the group's members that may judge) other than the
    accuser and the accused, as (guilty, why) for `judge`; None while none of them has spoken. A tie
    settles without a ban, and so does an accusation that every other member of its round said it can't
    judge while nobody else voted: no verdict can come."""
    accuser, accused = accusation["accuser"], accusation["accused"]
    votes, unable = {accused: 0, accuser: 0}, set()
    for signer, blob in verdicts.items():
        if signer in (accuser, accused) or signer not in voters:
            continue
        try:
            verdict = expect(blob, signer=signer, kind=VERDICT_KIND, accusation=accusation["accusation"])
        except InvalidStatement:
            continue
        if verdict.get("guilty") in votes:
            votes[verdict["guilty"]] += 1
        elif verdict.get("guilty") == CANNOT_JUDGE:
            unable.add(signer)
    if not any(votes.values()):
        judges = round_members(accusation) - {accuser, accused}
        if judges and judges <= unable:
            return GOOD_FAITH, (
                f"none of the {len(judges)} other members of the round can judge it (they no longer hold "
                "what the recomputation needs): no verdict can come"
            )
        return None
    why = f"{votes[accused]} of the group's other members found the gradient wrong, {votes[accuser]} right"
    if votes[accused] > votes[accuser]:
        return accused, why
    if votes[accuser] > votes[accused]:
        return None, why
    return GOOD_FAITH, why


def round_members(accusation: dict) -> set[str]:
    """The members a "bad_gradient" accusation shows in its round: signers of valid commitments to it."""
    members = set()
    for blob in accusation["evidence"]:
        try:
            signer, _ = open_statement(blob)
            expect(blob, kind="commit", prefix=accusation["prefix"], step=accusation["step"])
        except InvalidStatement:
            continue
        members.add(signer)
    return members


VALIDATION_ATTEMPTS = 3  # a validator asks its target this many times for its contribution
VALIDATION_RETRY_DELAY = 2.0
MAX_EVIDENCE_COMMITS = 8  # commitments an accusation carries (they name the round's members who may judge it)


class GroupValidation:
    """Gradient validation in one averaging group, for one member: after each robust round, check the
    members the round's seed gives it, and accuse on proof; judge "bad_gradient" accusations about its
    group's rounds by recomputing them.

    :param bans: the run's `swarm.training.bans.RunBans` (its key, bans and wake-up; it calls `judge`)
    :param validators: (validator, target) pairs per round (the run file's `averaging.validators`)
    :param loop: the event loop validations run on (rounds end on the averager's checks thread)
    """

    def __init__(
        self,
        validator: GradientValidator,
        bans,
        dht,
        signing_key: RSAPrivateKey,
        own_id: str,
        validators: int,
        loop: asyncio.AbstractEventLoop,
    ):
        self.validator, self.bans, self.dht, self.key = validator, bans, dht, signing_key
        self.own_id, self.validators, self.loop = own_id, validators, loop
        self._filed: dict[str, tuple[str, str]] = {}  # hex digest of our accusations -> (guilty, why)
        self._unheld: set[str] = set()  # accusations whose steps this member could not hold (logged once)
        self._holding: dict[str, str] = {}  # accusations whose steps this member holds -> their accuser
        self._judged: set[str] = set()  # accusations this member judged (or can't): it holds nothing for them
        self._round_members: dict[int, set[str]] = {}  # step -> members of this member's round at that step
        # step -> the peers whose weights (and optimizer state) of that step are this member's; None: everyone
        # (the run's checkpoint). A round averages gradients: two members that apply the same aggregate keep
        # equal weights only if they had them before, so equality runs unbroken from a common start
        self._same_at: dict[int, frozenset[str] | None] = {0: None}
        bans.gradient_judge = self.judge
        bans.gradient_hold = self.hold_for
        validator.same_weights = self.same_weights

    @property
    def log(self) -> ContributionLog:
        """What this member keeps of its rounds (its weights and contributions)."""
        return self.validator.owner.log

    def loaded_state(self, step: int, donor: str) -> None:
        """This member took `donor`'s parameters and optimizer state of `step` (joining, or resyncing): from
        there its weights are the donor's, and nobody else's for sure (at step 0, everyone's: the
        checkpoint's, as a peer that joins before the first step loads them)."""
        self._same_at = {step: None if step == 0 else frozenset({donor})}

    def same_weights(self, peer: str, step: int) -> str | None:
        """Why this member's weights of `step` may differ from `peer`'s (None: they are equal). They are when
        both started from the checkpoint (or one loaded the other's state) and took part in every round
        since together: a member that stepped alone, or missed a round, holds weights of its own from then
        on, and recomputing with them, or against them, would accuse an honest peer."""
        if step == 0:
            return None  # the run's checkpoint, however long ago (the record below keeps the last steps)
        if step not in self._same_at:
            return f"this peer's weights of step {step} are its own (it stepped alone, or kept no record)"
        same = self._same_at[step]
        if same is not None and peer not in same:
            return f"{peer} missed a round of this peer's since their weights matched: those of {step} differ"
        return None

    def judge_refusal(self, peer: str) -> str | None:
        """Why `peer` may not ask this member to trace a gradient for a dispute (None: it may). Judges are
        members of the accused's group, so only a peer of one of this member's recent rounds may ask: a
        trace costs a contribution's fetch and a forward and backward of every microbatch."""
        if any(peer in members for members in list(self._round_members.values())):
            return None
        return (
            f"{peer} was in none of this peer's last {KEEP_STEPS} rounds, so it judges none of its disputes"
        )

    def on_round(self, record) -> None:
        """After a robust round's checks (a `btard.RoundRecord`, on their thread): remember who took part,
        and start the validations this member owes the round."""
        if record.members:
            step = record.transcript.step
            self.log.hold_round(step)  # validations of it may accuse after the window rolls on
            self._round_members[step] = set(record.members)
            for old in sorted(self._round_members)[:-KEEP_STEPS]:
                del self._round_members[old]
            if step in self._same_at:
                before = self._same_at[step]
                members = frozenset(record.members)
                self._same_at[step + 1] = members if before is None else before & members
            else:  # weights of its own at this step: after it, too
                self._same_at[step + 1] = frozenset()
            for old in sorted(self._same_at)[: -(KEEP_STEPS + 1)]:
                del self._same_at[old]
        if record.seed is None or not self.validators or self.loop.is_closed():
            return
        for validator, target in choose_pairs(record.seed, record.members, self.validators):
            if validator == self.own_id and target not in self.bans.banned():
                asyncio.run_coroutine_threadsafe(self.validate(record, target), self.loop)

    async def validate(self, record, target: str) -> bytes | None:
        """Check `target`'s gradient of the round; returns the accusation filed, if any."""
        step, commits = record.transcript.step, record.transcript.commits
        if target not in commits:
            return None
        for attempt in range(1, VALIDATION_ATTEMPTS + 1):
            try:
                guilty, why = await self.validator.check(target, step, commits[target])
                break
            except CannotJudge as e:
                logger.info("can't validate %s's gradient of step %d: %s", target, step, e)
                return None
            except ContributionUnavailable as e:
                if attempt == VALIDATION_ATTEMPTS:
                    # not proof of anything (it may be busy): an accusation it could later answer would ban us
                    logger.warning("%s did not show its contribution to step %d: %s", target, step, e)
                    return None
                await asyncio.sleep(VALIDATION_RETRY_DELAY)
        if guilty is None:
            logger.info("validated %s: %s", target, why)
            return None
        others = [commits[m] for m in sorted(commits) if m != target][: MAX_EVIDENCE_COMMITS - 1]
        blob = make_accusation(
            self.key,
            BAD_GRADIENT,
            target,
            record.prefix,
            step,
            record.transcript.group_id,
            0,
            [commits[target], *others],
        )
        logger.warning("accusing %s of a bad gradient: %s", target, why)
        self._filed[digest(blob).hex()] = (guilty, why)  # judged already: no second recomputation
        # the accuser traces the accused's contribution with its weights in every judge's game
        self._hold(digest(blob).hex(), self.own_id, target, step)
        self.bans.add_local([blob])  # judged here at once; the DHT store (retried) lets the others judge
        try:
            await asyncio.to_thread(file_accusation, self.dht, self.bans.key, self.key, blob)
        except Exception as e:
            logger.warning("filing an accusation against %s failed: %r", target, e)
        return blob

    def hold_for(self, accusation: dict) -> None:
        """Hold the weights (and this member's contribution) of the steps a "bad_gradient" accusation about
        this group's rounds needs, from when this member first sees it (`RunBans` calls it before judging):
        rounds move on while it is judged, and a judge without the weights can't judge. Judges release them
        once they have judged (`judge`); the parties hold them until the accusation's hold expires, as other
        judges ask them for traces."""
        if accusation["prefix"] != self.validator.prefix or accusation["accused"] in self.bans.banned():
            return
        self._hold(accusation["accusation"], accusation["accuser"], accusation["accused"], accusation["step"])

    def _hold(self, accusation: str, accuser: str, accused: str, step: int) -> None:
        banned = self.bans.banned()
        for held, by in list(self._holding.items()):
            if by in banned:  # proven a false accuser (or a cheat): its accusations need no more traces
                self.log.release(f"accusation {held}")
            if not self.log.holds(f"accusation {held}"):  # released, or expired
                self._holding.pop(held, None)
        # a round's microbatches ran with the weights of its step or the one before; those gone stay gone
        steps = [s for s in (step - 1, step) if s >= 0 and self.log.weights(s) is not None]
        if accusation in self._judged or not steps:
            return
        if self.log.hold(f"accusation {accusation}", steps, ACCUSATION_HOLD_SECONDS):
            self._holding[accusation] = accuser
            return
        if accusation not in self._unheld:
            self._unheld.add(accusation)
            logger.warning(
                "not holding steps %s for the accusation against %s: this peer already holds steps %s for "
                "others (at most %d at once); it can't judge it once they roll out of its last %d rounds",
                steps,
                accused,
                sorted(self.log.held()),
                self.log.max_held,
                KEEP_STEPS,
            )

    async def judge(self, accusation: dict) -> tuple[str | None, str]:
        """Recompute the gradient a "bad_gradient" accusation is about (CannotJudge: not our group's)."""
        if accusation["prefix"] != self.validator.prefix:
            raise NotOurGroup("the accusation is about another group's round")
        if accusation["accusation"] in self._filed:
            return self._filed.pop(accusation["accusation"])
        try:
            verdict = await self.validator.check(
                accusation["accused"],
                accusation["step"],
                accusation["evidence"][0],
                accuser=accusation["accuser"],
            )
        except CannotJudge:
            self._release(accusation)
            raise
        self._release(accusation)  # ContributionUnavailable keeps the hold: this member tries again
        return verdict

    def _release(self, accusation: dict) -> None:
        """A judge is done with an accusation's steps; its parties still trace it for other judges."""
        if self.own_id not in (accusation["accused"], accusation["accuser"]):
            self._judged.add(accusation["accusation"])  # RunBans asks to hold it until it is settled
            self._holding.pop(accusation["accusation"], None)
            self.log.release(f"accusation {accusation['accusation']}")
