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
- every stage peer that judges the accusation recomputes the same way and publishes its signed verdict;
  members without the stage's weights (trainers, `swarm run status`) follow the majority of the verdicts
  of the round's other members (the majority-of-three settlement; bisection to one operator comes with
  refereed verification).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import AsyncIterator  # noqa: UP035 (hivemind recognises streams by typing.AsyncIterator only)

import torch
from hivemind.p2p import P2P
from hivemind.utils.crypto import RSAPrivateKey

from swarm.averaging.accusations import GOOD_FAITH
from swarm.averaging.commitments import chunk_digests
from swarm.averaging.statements import InvalidStatement, expect, open_statement, sign_statement
from swarm.proto import swarm_pb2
from swarm.protocol import STREAM_CHUNK_BYTES, TrainStateProtocol
from swarm.utils.streaming import combine_parts, split_tensors
from swarm.utils.tensors import FLOAT_DTYPES, deserialize_checked, serialize

logger = logging.getLogger(__name__)

RECEIPT_KIND = "microbatch"
VERDICT_KIND = "gradient_verdict"
VERDICT_TAG = "gverdict"
# relative L2 distance allowed between a sent gradient and its recomputation. Members' weights differ by a
# few ulps of all-reduce rounding, which moves an honest gradient by about 1e-6 of its norm; the attacks
# move it by more than its norm
VALIDATION_RTOL = 1e-3
KEEP_STEPS = 4  # rounds whose contributions (and weights) a stage peer keeps for validators and judges
MAX_CONTRIBUTION_BYTES = 16 * 1024**3


class CannotJudge(RuntimeError):
    """This peer lacks what a recomputation needs (e.g. the weights of that step): no verdict either way."""


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """sha256 of a tensor's dtype, shape and bytes."""
    tensor = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.digest()


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


@dataclass
class Microbatch:
    """One backward call behind a stage peer's gradient."""

    receipt: bytes
    inputs: torch.Tensor
    grad_outputs: torch.Tensor
    weights_step: int  # the step of the weights that computed it


@dataclass
class Contribution:
    """A stage peer's share of one round: the gradient it sent and the microbatches it came from."""

    step: int
    sent: list[torch.Tensor]
    microbatches: list[Microbatch]


class ContributionLog:
    """What a stage peer keeps so that validators can recompute its gradient of its last `keep` rounds.

    `add` (every backward) and `close` (when the round's gradient is taken) run on the compute thread;
    `record_sent` when the gradient is handed to the averager; `snapshot` whenever the weights change.
    """

    def __init__(self, keep: int = KEEP_STEPS):
        self.keep = keep
        self._lock = threading.Lock()
        self._open: list[Microbatch] = []
        self._closed: dict[int, list[Microbatch]] = {}
        self._sent: dict[int, list[torch.Tensor]] = {}
        self._weights: dict[int, list[torch.Tensor]] = {}

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

    def forget_weights(self) -> None:
        """Forget the kept weights: this peer's were replaced by another's, so its earlier ones may not be
        the group's (recomputing with them could accuse an honest peer). Its own contributions stay: they
        are what it did, and validators may still ask for them."""
        with self._lock:
            self._weights = {}

    def weights(self, step: int) -> list[torch.Tensor] | None:
        with self._lock:
            return self._weights.get(step)

    def get(self, step: int) -> Contribution | None:
        with self._lock:
            if step not in self._sent or step not in self._closed:
                return None
            return Contribution(step, self._sent[step], list(self._closed[step]))

    def _forget(self, by_step: dict) -> None:
        for step in sorted(by_step)[: -self.keep]:
            del by_step[step]


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
        names += [f"mb{k}.inputs", f"mb{k}.grad_outputs"]
        tensors += [microbatch.inputs, microbatch.grad_outputs]
    yield swarm_pb2.TrainContributionResponse(
        found=True,
        step=contribution.step,
        names=names,
        receipts=[m.receipt for m in contribution.microbatches],
        weight_steps=[m.weights_step for m in contribution.microbatches],
    )
    batch, size = [], 0
    for part in split_tensors([serialize(t) for t in tensors], STREAM_CHUNK_BYTES):
        if batch and size + len(part.buffer) > STREAM_CHUNK_BYTES:
            yield swarm_pb2.TrainContributionResponse(tensors=batch)
            batch, size = [], 0
        batch.append(part)
        size += len(part.buffer)
    if batch:
        yield swarm_pb2.TrainContributionResponse(tensors=batch)


class ContributionUnavailable(RuntimeError):
    """The peer did not answer, or answered with an error."""


async def fetch_contribution(
    p2p: P2P, peer_id: str, run_hash: str, step: int, num_sent: int, timeout: float
) -> Contribution | None:
    """A stage peer's contribution to round `step` (None: it says it kept none).

    :raises ContributionUnavailable: no answer in time, an error reply, or a malformed one
    """

    async def collect():
        stub = TrainStateProtocol.stub(p2p, peer_id)
        request = swarm_pb2.TrainContributionRequest(run_hash=run_hash, step=step)
        header, parts = None, []
        async for response in await stub.rpc_train_contribution(request):
            if response.HasField("error"):
                raise ContributionUnavailable(f"{peer_id} refused: {response.error.message}")
            header = header or response
            parts.extend(response.tensors)
        return header, parts

    try:
        header, parts = await asyncio.wait_for(collect(), timeout)
    except ContributionUnavailable:
        raise
    except Exception as e:
        raise ContributionUnavailable(f"{peer_id} did not answer: {e!r}") from e
    if header is None:
        raise ContributionUnavailable(f"{peer_id} sent nothing")
    if not header.found:
        return None
    try:
        protos = combine_parts(parts, MAX_CONTRIBUTION_BYTES)
        count = len(header.receipts)
        expected = [f"sent{i}" for i in range(num_sent)]
        expected += [f"mb{k}.{name}" for k in range(count) for name in ("inputs", "grad_outputs")]
        if (
            list(header.names) != expected
            or len(protos) != len(expected)
            or len(header.weight_steps) != count
        ):
            raise ValueError("the names, tensors and receipts do not line up")
        tensors = [
            deserialize_checked(
                p, name=n, allowed_dtypes=FLOAT_DTYPES, ndim=None, max_bytes=MAX_CONTRIBUTION_BYTES
            )
            for n, p in zip(expected, protos, strict=True)
        ]
    except Exception as e:
        raise ContributionUnavailable(f"{peer_id} sent a malformed contribution: {e}") from e
    microbatches = [
        Microbatch(
            bytes(header.receipts[k]), tensors[num_sent + 2 * k], tensors[num_sent + 2 * k + 1], int(ws)
        )
        for k, ws in enumerate(header.weight_steps)
    ]
    return Contribution(int(header.step), tensors[:num_sent], microbatches)


# ---- recomputing -----------------------------------------------------------------------------------------


class GradientValidator:
    """Recomputes other members' gradients from their contributions, with this stage peer's weights.

    :param backend: this peer's TrainableSpanBackend (its weights, snapshots and compute thread)
    :param prefix: the stage's averaging prefix (commitments name it)
    :param part_size_bytes: the robust rounds' chunk size (commitments hash chunks of that size)
    """

    def __init__(
        self,
        backend,
        p2p: P2P,
        run_hash: str,
        stage: int,
        prefix: str,
        part_size_bytes: int,
        timeout: float = 60.0,
    ):
        self.backend, self.p2p, self.run_hash, self.stage = backend, p2p, run_hash, stage
        self.prefix, self.part_size_bytes, self.timeout = prefix, part_size_bytes, timeout

    async def check(self, peer: str, step: int, commit: bytes) -> tuple[str | None, str]:
        """(peer, why) if its round-`step` gradient is proven wrong, (None, why) if it checks out.

        :raises ContributionUnavailable: the peer could not be reached (try again later)
        :raises CannotJudge: this peer lacks the weights the recomputation needs
        """
        try:
            committed = expect(commit, signer=peer, kind="commit", prefix=self.prefix, step=step)["chunks"]
        except (InvalidStatement, KeyError) as e:
            raise CannotJudge(f"no valid commitment of {peer} for step {step}: {e}") from e
        num_sent = len(self.backend.trainable.params)
        contribution = await fetch_contribution(self.p2p, peer, self.run_hash, step, num_sent, self.timeout)
        if contribution is None:
            return peer, f"kept no contribution to step {step} it committed to"
        shapes = [tuple(p.shape) for p in self.backend.trainable.params]
        if [tuple(t.shape) for t in contribution.sent] != shapes:
            return peer, f"showed a gradient of step {step} with the wrong shapes"
        if chunk_digests(contribution.sent, self.part_size_bytes) != committed:
            return peer, f"showed a gradient of step {step} other than the one it committed to"
        for k, microbatch in enumerate(contribution.microbatches):
            try:
                check_receipt(
                    microbatch.receipt, self.run_hash, self.stage, microbatch.inputs, microbatch.grad_outputs
                )
            except InvalidStatement as e:
                return peer, f"microbatch {k} of step {step} has no valid receipt: {e}"
            if microbatch.weights_step not in (step - 1, step):
                return peer, f"microbatch {k} of step {step} claims weights of step {microbatch.weights_step}"
        needed = sorted({m.weights_step for m in contribution.microbatches})
        weights = {s: self.backend.log.weights(s) for s in needed}
        missing = [s for s, w in weights.items() if w is None]
        if missing:
            raise CannotJudge(f"this peer no longer holds the weights of step(s) {missing}")
        expected = await self.backend.run_on_compute_thread(
            self.backend.recompute_mean_gradient, contribution.microbatches, weights
        )
        error = relative_error(contribution.sent, expected)
        if error > VALIDATION_RTOL:
            return peer, (
                f"its gradient of step {step} ({len(contribution.microbatches)} microbatches) differs from "
                f"the recomputation by {error:.2e} of its norm"
            )
        return None, f"its gradient of step {step} matches the recomputation ({error:.1e} of its norm)"


def verdict_statement(key: RSAPrivateKey, accusation: str, guilty: str) -> bytes:
    """A stage peer's signed verdict on a "bad_gradient" accusation (hex digest), for members that can't
    recompute it themselves."""
    return sign_statement(key, {"kind": VERDICT_KIND, "accusation": accusation, "guilty": guilty})


def majority_verdict(
    accusation: dict, verdicts: dict[str, bytes], round_members: set[str]
) -> tuple[str | None, str] | None:
    """The verdict of the majority of the round's other members (neither accuser nor accused), as
    (guilty, why) for `judge`; None while none of them has spoken. A tie settles without a ban."""
    accuser, accused = accusation["accuser"], accusation["accused"]
    votes = {accused: 0, accuser: 0}
    for signer, blob in verdicts.items():
        if signer in (accuser, accused) or signer not in round_members:
            continue
        try:
            verdict = expect(blob, signer=signer, kind=VERDICT_KIND, accusation=accusation["accusation"])
        except InvalidStatement:
            continue
        if verdict.get("guilty") in votes:
            votes[verdict["guilty"]] += 1
    if not any(votes.values()):
        return None
    why = f"{votes[accused]} of the round's other members found the gradient wrong, {votes[accuser]} right"
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
