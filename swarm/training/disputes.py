"""Gradient disputes between stage peers over hivemind P2P (the game: swarm.verification.gradient_dispute).

A judge of a "bad_gradient" accusation (a member of the accused's group, holding the group's weights of that
step) no longer recomputes the whole contribution: it asks the accused and its accuser to commit to traces
of it, plays the bisection game with both, and recomputes one leaf (one block's forward or backward for one
microbatch, or one sum). Its side is `settle`; each stage peer's side is `GradientDisputeService`.

Only a game played to the end convicts. A party that does not commit, or whose determinism profile differs
from the judge's, leaves the judge to recompute the whole gradient as before (`CannotSettle`): an accused
that lost its old weights, say, is not convicted for it. During the game, silence, a failed proof or a wrong
leaf loses, as in inference disputes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import Callable

import torch
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.utils.crypto import RSAPrivateKey

from swarm.averaging.statements import InvalidStatement, expect, sign_statement
from swarm.node.errors import RequestError, error_reply
from swarm.proto import swarm_pb2
from swarm.protocol import MAX_UNARY_MESSAGE_BYTES, TrainStateProtocol
from swarm.testing.faults import Fault
from swarm.training.validation import Contribution, fetch_contribution
from swarm.verification.determinism import determinism_profile, is_deterministic, same_profile
from swarm.verification.dispute import PARTIES, Answer, Question
from swarm.verification.gradient_dispute import (
    GradientCommitment,
    GradientDispute,
    GradientLayout,
    GradientParty,
    GradientVerdict,
    PublicData,
    layout_of,
    recompute_leaf,
    trace_gradient,
    weights_loaded,
)
from swarm.verification.merkle import tensor_digest
from swarm.verification.remote import RemoteParty
from swarm.verification.service import (
    ENVELOPE_BYTES,
    SILENT_FOR,
    TraceStore,
    check_request_id,
    encode_answer,
    trace_key,
)

logger = logging.getLogger(__name__)

COMMIT_KIND = "gradient_commit"


class CannotSettle(RuntimeError):
    """The game could not be played to a verdict; the judge recomputes the whole gradient instead."""


def contribution_digest(contribution: Contribution) -> bytes:
    """One hash of what a contribution shows: the sent gradient and each microbatch (its tensors, receipts
    and weights step), so that the judge and both parties trace the same one."""
    hasher = hashlib.sha256(f"step {contribution.step}|".encode())
    for tensor in contribution.sent:
        hasher.update(tensor_digest(tensor))
    for microbatch in contribution.microbatches:
        hasher.update(f"|{microbatch.kind}|{microbatch.weights_step}|".encode())
        for name in sorted(microbatch.tensors):
            hasher.update(name.encode() + tensor_digest(microbatch.tensors[name]))
        for receipt in microbatch.receipts:
            hasher.update(hashlib.sha256(receipt).digest())
    return hasher.digest()


def public_data(contribution: Contribution) -> PublicData:
    """The microbatches' inputs and output gradients, and the samples the mean divides by."""
    microbatches = contribution.microbatches
    return PublicData(
        [m.tensors["inputs"] for m in microbatches],
        [m.tensors["grad_outputs"] for m in microbatches],
        sum(m.tensors["inputs"].shape[0] for m in microbatches),
    )


def _profile(backend) -> dict[str, str]:
    """What must match for this peer's traces to equal another's bit for bit (training runs fp32)."""
    return determinism_profile(torch.float32, backend.device)


def _commit_payload(
    run_hash: str, step: int, accused: str, contribution: bytes, commitment, profile: dict[str, str]
) -> dict:
    return {
        "kind": COMMIT_KIND,
        "run": run_hash,
        "step": int(step),
        "accused": accused,
        "contribution": contribution.hex(),
        "commitment": commitment.to_dict(),
        "profile": profile,
    }


class GradientDisputeService:
    """A stage peer's side of gradient disputes: trace a contribution on request, keep the trace for the
    judge that asked (TraceStore: bounded in count, bytes and time), answer its questions.

    :param backend: the stage's TrainableSpanBackend (its span, weights log and compute thread)
    :param fault: a testing fault; its corrupt_backward shapes this peer's own traces as it shaped what it
        sent, and its answer_dispute its answers
    :param judge_refusal: why a caller may not ask for a trace (None: it may); the node passes its group
        validation's, so that only a member of its recent rounds makes it fetch and trace
    """

    def __init__(
        self,
        backend,
        p2p: P2P,
        run_hash: str,
        own_id: str,
        signing_key: RSAPrivateKey,
        fault: Fault | None = None,
        timeout: float = 60.0,
        store: TraceStore | None = None,
        judge_refusal: Callable[[str], str | None] | None = None,
    ):
        self.backend, self.p2p, self.run_hash, self.own_id = backend, p2p, run_hash, own_id
        self.key, self.fault, self.timeout = signing_key, fault, timeout
        self.store = store if store is not None else TraceStore()
        self.judge_refusal = judge_refusal
        self._tracing: set[str] = set()  # callers with a commit in progress: one at a time each

    async def commit(
        self, request: swarm_pb2.TrainDisputeCommitRequest, context: P2PContext
    ) -> swarm_pb2.CommitResponse:
        caller = context.remote_id.to_base58()
        try:
            check_request_id(request.request_id)
            step, accused = int(request.step), request.accused
            own = accused == self.own_id
            if not own:
                try:
                    PeerID.from_base58(accused)
                except Exception:
                    raise RequestError(swarm_pb2.Error.BAD_REQUEST, "accused is not a peer id") from None
            if self.judge_refusal is not None and (reason := self.judge_refusal(caller)) is not None:
                raise RequestError(swarm_pb2.Error.FORBIDDEN, reason)
            if caller in self._tracing:
                raise RequestError(swarm_pb2.Error.OVERLOADED, "this caller's previous trace is in progress")
            self._tracing.add(caller)
            try:
                return await self._commit(request, context, step, accused, own)
            finally:
                self._tracing.discard(caller)
        except Exception as e:
            return error_reply(swarm_pb2.CommitResponse, e, context, "train_dispute_commit", logger)

    async def _commit(
        self,
        request: swarm_pb2.TrainDisputeCommitRequest,
        context: P2PContext,
        step: int,
        accused: str,
        own: bool,
    ) -> swarm_pb2.CommitResponse:
        contribution = await self._contribution(step, accused, own)
        if contribution_digest(contribution) != request.contribution:
            raise RequestError(
                swarm_pb2.Error.BAD_REQUEST,
                f"the contribution {accused} shows this peer for step {step} is not the judge's",
            )
        steps = [m.weights_step for m in contribution.microbatches]
        weights = {s: self.backend.log.weights(s) for s in set(steps)}
        if missing := sorted(s for s, w in weights.items() if w is None):
            raise RequestError(
                swarm_pb2.Error.UNKNOWN_SESSION,
                f"this peer no longer holds the weights of steps {missing}",
            )
        corrupt = self.fault.corrupt_backward if own and self.fault is not None else None
        public = public_data(contribution)
        leaves = await self.backend.run_on_compute_thread(
            trace_gradient, self.backend.span, public, [weights[s] for s in steps], corrupt, steps
        )
        party = GradientParty(step, layout_of(self.backend.span, len(steps)), leaves)
        self.store.put(trace_key(context, request.request_id), party, party.nbytes)
        payload = _commit_payload(
            self.run_hash, step, accused, request.contribution, party.commitment, _profile(self.backend)
        )
        return swarm_pb2.CommitResponse(
            commitment=json.dumps(party.commitment.to_dict()).encode(),
            signature=sign_statement(self.key, payload),
        )

    async def _contribution(self, step: int, accused: str, own: bool) -> Contribution:
        if own:
            contribution = self.backend.log.get(step)
        else:  # the accuser traces what the accused shows, with its own weights
            shapes = self.backend.gradient_shapes()
            contribution = await fetch_contribution(
                self.p2p, accused, self.run_hash, step, len(shapes), self.timeout
            )
        if contribution is None:
            raise RequestError(
                swarm_pb2.Error.UNKNOWN_SESSION, f"no contribution of {accused} to step {step}"
            )
        return contribution

    async def answer(
        self, request: swarm_pb2.DisputeQuestionRequest, context: P2PContext
    ) -> swarm_pb2.DisputeAnswerResponse:
        try:
            party: GradientParty = self.store.get(trace_key(context, check_request_id(request.request_id)))
            refs = tuple(request.refs)
            num_leaves = party.commitment.layout.num_leaves
            if not 0 < len(refs) <= num_leaves or len(set(refs)) != len(refs):
                raise RequestError(swarm_pb2.Error.BAD_REQUEST, "a question names distinct leaves")
            if bad := [ref for ref in refs if not 0 <= ref < num_leaves]:
                raise RequestError(swarm_pb2.Error.BAD_REQUEST, f"leaves {bad} are outside the trace")
            if request.tensors:
                nbytes = sum(party.leaves[ref].numel() * party.leaves[ref].element_size() for ref in refs)
                if nbytes > MAX_UNARY_MESSAGE_BYTES - ENVELOPE_BYTES:
                    raise RequestError(swarm_pb2.Error.TOO_LARGE, f"{nbytes} bytes of tensors are too many")
            answer: Answer | None = party.respond(Question(request.round, refs, request.tensors))
            if self.fault is not None:
                answer = self.fault.answer_dispute(answer)
            if answer is None:  # a silent party (a fault): the judge's timeout makes it forfeit
                await asyncio.sleep(SILENT_FOR)
                raise RequestError(swarm_pb2.Error.TIMEOUT, "no answer")
            return encode_answer(refs, answer, request.tensors)
        except Exception as e:
            return error_reply(swarm_pb2.DisputeAnswerResponse, e, context, "train_dispute_answer", logger)


async def _remote_commit(
    p2p: P2P,
    peer: str,
    run_hash: str,
    step: int,
    accused: str,
    request_id: str,
    digest: bytes,
    profile: dict[str, str],
    timeout: float,
) -> GradientCommitment:
    request = swarm_pb2.TrainDisputeCommitRequest(
        run_hash=run_hash, step=step, accused=accused, request_id=request_id, contribution=digest
    )
    stub = TrainStateProtocol.stub(p2p, peer)
    response = await asyncio.wait_for(stub.rpc_train_dispute_commit(request, timeout=timeout), timeout)
    if response.HasField("error"):
        raise CannotSettle(f"{peer} did not commit: {response.error.message}")
    try:
        payload = expect(
            response.signature,
            signer=peer,
            kind=COMMIT_KIND,
            run=run_hash,
            step=step,
            accused=accused,
            contribution=digest.hex(),
        )
        commitment = GradientCommitment.from_dict(payload["commitment"])
    except (InvalidStatement, KeyError, TypeError, ValueError) as e:
        raise CannotSettle(f"{peer} sent a malformed commitment: {e}") from e
    if not isinstance(payload.get("profile"), dict) or not same_profile(payload["profile"], profile):
        raise CannotSettle(f"{peer} computes with another determinism profile than this judge")
    return commitment


async def settle(
    backend,
    p2p: P2P,
    run_hash: str,
    accused: str,
    accuser: str,
    contribution: Contribution,
    weights: dict[int, list[torch.Tensor]],
    timeout: float,
) -> tuple[GradientVerdict, GradientLayout]:
    """Referee the game between `accused` ("a") and `accuser` ("b") over `contribution` (the judge's copy,
    already checked against the accused's signed commitment and receipts), recomputing with `weights` (the
    judge's, per step; the group's weights of those steps). Runs the recomputation on `backend`'s compute
    thread.

    :raises CannotSettle: a party did not commit (or not with the judge's profile), or the accuser fell
        silent: the judge recomputes the whole gradient instead
    """
    step, request_id = contribution.step, uuid.uuid4().hex
    digest, profile = contribution_digest(contribution), _profile(backend)
    if not is_deterministic(profile):
        raise CannotSettle("this judge does not run the deterministic profile: traces can't be compared")
    layout = layout_of(backend.span, len(contribution.microbatches))
    commitments = await asyncio.gather(
        *(
            _remote_commit(p2p, peer, run_hash, step, accused, request_id, digest, profile, timeout)
            for peer in (accused, accuser)
        ),
        return_exceptions=True,
    )
    for peer, commitment in zip((accused, accuser), commitments, strict=True):
        if isinstance(commitment, BaseException):
            raise commitment if isinstance(commitment, CannotSettle) else CannotSettle(repr(commitment))
        if commitment.layout != layout or commitment.step != step:
            raise CannotSettle(f"{peer} committed to a trace of another shape")
    public = public_data(contribution)
    microbatches = contribution.microbatches

    def recompute(leaf: int, inputs: dict[int, torch.Tensor]) -> torch.Tensor:
        k = layout.role(leaf).microbatch
        values = None if k is None else weights[microbatches[k].weights_step]
        with weights_loaded(backend.trainable.params, values):
            return recompute_leaf(backend.span, layout, leaf, inputs, public)

    dispute = GradientDispute(
        commitments[0], commitments[1], [tensor_digest(t) for t in contribution.sent], recompute
    )
    parties = {
        "a": RemoteParty(p2p, accused, request_id, timeout, rpc=_ask_stage),
        "b": RemoteParty(p2p, accuser, request_id, timeout, rpc=_ask_stage),
    }
    while (question := dispute.next_question()) is not None:
        answers = await asyncio.gather(*(parties[name].respond(question) for name in PARTIES))
        # the last answer may recompute a leaf with other weights loaded: where forward and backward run
        await backend.run_on_compute_thread(_feed, dispute, answers)
    verdict = dispute.verdict()
    if "b" in verdict.losers and verdict.reasons["b"] == "silent":
        raise CannotSettle(f"the accuser {accuser} fell silent: {parties['b'].failure}")
    return verdict, layout


def _feed(dispute: GradientDispute, answers: list[Answer | None]) -> None:
    for name, answer in zip(PARTIES, answers, strict=True):
        if answer is None:
            dispute.forfeit(name)
        else:
            dispute.answer(name, answer)


async def _ask_stage(p2p: P2P, peer_id: str, request: swarm_pb2.DisputeQuestionRequest, timeout: float):
    return await TrainStateProtocol.stub(p2p, peer_id).rpc_train_dispute_answer(request, timeout=timeout)
