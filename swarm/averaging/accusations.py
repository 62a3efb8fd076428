"""Accusations of BTARD rounds and the verdicts on them: who is banned, and why.

An accusation is a statement signed by the accuser (see `swarm.averaging.statements`):

    {kind: "accusation", reason, accused, prefix, step, group, chunk, evidence: [statement blobs]}

Reasons:
- "equivocation": a sender sent bytes other than it committed to. evidence = [its commit, its parts
  statement covering `chunk`], both signed by the accused: proven when the parts statement's hash of that
  chunk differs from the commit's;
- "reducer_equivocation": a reducer sent a result other than the one it published afterwards.
  evidence = [its result statement for `chunk`, its after statement], both signed by the accused: proven
  when the after statement gives another hash for that chunk (or none);
- "bad_aggregate": a reducer's result fails the projection check (`swarm.averaging.projection`).
  evidence = [its result statement, optionally followed by the senders' projections statements]. Only
  the parts the reducer kept can settle it, so it is re-checked through an injected `recheck` (which
  fetches them and calls `judge_aggregate`);
- "bad_gradient": a member's gradient differs from its recomputation by a validator
  (`swarm.training.validation`). evidence = [its commit for the round, then the other members' commits]
  (they show who was in the round). Only a recomputation settles it: re-checked through `recheck` too.

What is not proven is a false accusation, and bans its accuser (who signed it). Ignored: a statement that
is not a validly signed accusation (nobody can be held to it) and a peer accusing itself; undecided: a
"bad_aggregate" accusation with no `recheck`, or whose `recheck` raised (judged again later).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.utils.crypto import RSAPrivateKey

from swarm.averaging.commitments import part_bytes, part_hash
from swarm.averaging.projection import check_chunk, fixed_point_residual, project, projection_vector
from swarm.averaging.statements import InvalidStatement, digest, expect, open_statement, sign_statement

logger = logging.getLogger(__name__)

EQUIVOCATION = "equivocation"
REDUCER_EQUIVOCATION = "reducer_equivocation"
BAD_AGGREGATE = "bad_aggregate"
BAD_GRADIENT = "bad_gradient"
REASONS = (EQUIVOCATION, REDUCER_EQUIVOCATION, BAD_AGGREGATE, BAD_GRADIENT)
GOOD_FAITH = ""  # a re-check's "guilty" when the accusation was justified but nobody cheated

Recheck = Callable[[dict], Awaitable[tuple[str | None, str]]]


@dataclass(frozen=True)
class Verdict:
    """The outcome of one accusation: `guilty` is banned for `reason`."""

    guilty: str  # peer id
    reason: str  # human readable
    step: int
    accusation: str  # hex sha256 of the accusation's bytes


def make_accusation(
    key: RSAPrivateKey,
    reason: str,
    accused: str,
    prefix: str,
    step: int,
    group: bytes,
    chunk: int,
    evidence: Sequence[bytes],
) -> bytes:
    """Sign an accusation against `accused` with the accuser's identity `key`."""
    payload = {
        "kind": "accusation",
        "reason": reason,
        "accused": accused,
        "prefix": prefix,
        "step": int(step),
        "group": bytes(group),
        "chunk": int(chunk),
        "evidence": [bytes(blob) for blob in evidence],
    }
    return sign_statement(key, payload)


class _Malformed(Exception):
    """The accusation does not hold together: its accuser signed something bogus."""


def _equivocated(payload: dict[str, Any], evidence: list[bytes]) -> bool:
    accused, prefix, step, chunk = payload["accused"], payload["prefix"], payload["step"], payload["chunk"]
    if len(evidence) != 2:
        raise _Malformed("equivocation needs [commit, parts] as evidence")
    try:
        commit = expect(evidence[0], signer=accused, kind="commit", prefix=prefix, step=step)
        parts = expect(evidence[1], signer=accused, kind="parts", prefix=prefix, step=step)
    except InvalidStatement as e:
        raise _Malformed(f"bad evidence: {e}") from None
    chunks = commit.get("chunks")
    if not isinstance(chunks, list) or not 0 <= chunk < len(chunks):
        raise _Malformed(f"the commitment has no chunk {chunk}")
    sent = part_hash(parts, chunk)
    if sent is None:
        raise _Malformed(f"the parts statement covers no chunk {chunk}")
    if parts.get("commit") != digest(evidence[0]):
        # the parts were sent under another commitment (e.g. an earlier round of the same step): no proof
        raise _Malformed("the parts statement belongs to another commitment")
    return chunks[chunk] != sent


def _reducer_equivocated(payload: dict[str, Any], evidence: list[bytes]) -> bool:
    accused, chunk = payload["accused"], payload["chunk"]
    fields = dict(prefix=payload["prefix"], step=payload["step"], group=payload["group"])
    if len(evidence) != 2:
        raise _Malformed("reducer equivocation needs [result, after] as evidence")
    try:
        result = expect(evidence[0], signer=accused, kind="result", chunk=chunk, **fields)
        after = expect(evidence[1], signer=accused, kind="after", **fields)
    except InvalidStatement as e:
        raise _Malformed(f"bad evidence: {e}") from None
    published = after.get("results")
    return not isinstance(published, dict) or published.get(chunk) != result.get("hash")


def _check_bad_aggregate_evidence(payload: dict[str, Any], evidence: list[bytes]) -> None:
    fields = dict(prefix=payload["prefix"], step=payload["step"], group=payload["group"])
    if not evidence:
        raise _Malformed("bad_aggregate needs [result, *projections] as evidence")
    try:
        expect(evidence[0], signer=payload["accused"], kind="result", chunk=payload["chunk"], **fields)
        # optionally, the senders' projections statements the accuser saw (so that a sender can't
        # overwrite a false one in the DHT once the accusation is filed)
        for blob in evidence[1:]:
            _, statement = open_statement(blob)
            if statement.get("kind") not in ("projections", "after"):
                raise InvalidStatement(f"unexpected {statement.get('kind')!r} statement")
            expect(blob, **fields)
    except InvalidStatement as e:
        raise _Malformed(f"bad evidence: {e}") from None


def _check_bad_gradient_evidence(payload: dict[str, Any], evidence: list[bytes]) -> None:
    if not evidence:
        raise _Malformed("bad_gradient needs [the accused's commit, *commits] as evidence")
    try:
        expect(
            evidence[0],
            signer=payload["accused"],
            kind="commit",
            prefix=payload["prefix"],
            step=payload["step"],
        )
    except InvalidStatement as e:
        raise _Malformed(f"bad evidence: {e}") from None


def _well_formed(payload: dict[str, Any]) -> list[bytes]:
    """The evidence of an accusation whose fields have the right types (raises _Malformed otherwise)."""
    types = {"reason": str, "accused": str, "prefix": str, "step": int, "group": bytes, "chunk": int}
    for name, kind in types.items():
        if not isinstance(payload.get(name), kind) or isinstance(payload.get(name), bool):
            raise _Malformed(f"field {name!r} is missing or not a {kind.__name__}")
    evidence = payload.get("evidence")
    if not isinstance(evidence, list) or not all(isinstance(blob, bytes) for blob in evidence):
        raise _Malformed("evidence must be a list of statements")
    return evidence


async def judge(blob: bytes, recheck: Recheck | None) -> Verdict | None:
    """Decide one accusation; returns who is guilty (the accused, a lying sender or the accuser), or None.

    None: the accusation is not a valid signed accusation (it can't be held against anyone), the accuser
    accuses itself, or it is a "bad_aggregate" accusation and there is no `recheck` to settle it.
    `recheck(payload + {"accuser": peer id})` returns (guilty or None, explanation); its exceptions
    propagate (the accusation is then undecided for now).
    """
    try:
        accuser, payload = open_statement(blob)
    except InvalidStatement:
        return None
    if payload.get("kind") != "accusation":
        return None  # some other statement of the signer's, relayed: not an accusation it made
    step = payload.get("step") if isinstance(payload.get("step"), int) else -1
    accusation = digest(blob).hex()

    def verdict(guilty: str, reason: str) -> Verdict:
        return Verdict(guilty=guilty, reason=reason, step=step, accusation=accusation)

    try:
        evidence = _well_formed(payload)
        accused, reason, chunk = payload["accused"], payload["reason"], payload["chunk"]
        if accused == accuser:
            return None
        if reason == EQUIVOCATION:
            if _equivocated(payload, evidence):
                return verdict(accused, f"equivocated on chunk {chunk} at step {step}")
            return verdict(
                accuser, f"false accusation against {accused}: its part {chunk} is the committed one"
            )
        if reason == REDUCER_EQUIVOCATION:
            if _reducer_equivocated(payload, evidence):
                return verdict(
                    accused, f"sent a result for chunk {chunk} at step {step} other than it published"
                )
            return verdict(accuser, f"false accusation against {accused}: it published its result {chunk}")
        if reason in (BAD_AGGREGATE, BAD_GRADIENT):
            if reason == BAD_AGGREGATE:
                _check_bad_aggregate_evidence(payload, evidence)
            else:
                _check_bad_gradient_evidence(payload, evidence)
            if recheck is None:
                return None
            guilty, explanation = await recheck(dict(payload, accuser=accuser, accusation=accusation))
            if guilty == GOOD_FAITH:
                logger.info("accusation against %s settled without a ban: %s", accused, explanation)
                return None
            if guilty is None:
                return verdict(accuser, f"false accusation against {accused}: {explanation}")
            what = f"bad aggregate of chunk {chunk}" if reason == BAD_AGGREGATE else "bad gradient"
            return verdict(guilty, f"{what} at step {step}: {explanation}")
        raise _Malformed(f"unknown reason {reason!r}")
    except _Malformed as e:
        return verdict(accuser, f"signed a bogus accusation: {e}")


def judge_aggregate(
    result_statement: bytes,
    reducer_id: str,
    commits: dict[str, bytes],
    parts: list[tuple[str, torch.Tensor, bytes]],
    aggregate: torch.Tensor,
    projections: dict[str, tuple[float, float]],
    seed: bytes,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    tau: float | None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    projection_rtol: float = 1e-6,
    accused_result: bytes | None = None,
) -> tuple[str | None, str]:
    """Re-check a reducer's chunk from the evidence it kept; returns (guilty peer or None, explanation).

    :param result_statement: the reducer's signed result for the chunk
    :param commits: sender -> its commit statement
    :param parts: (sender, part, its parts statement) for every part the reducer says it reduced
    :param aggregate: the reducer's result
    :param projections: sender -> its published (<z, x_i - v>, ||x_i - v||) for this chunk
    :param seed: the chunk's seed (from the senders' revealed secrets)
    :param reduce: the round's reducer, f(stacked parts) -> aggregate
    :param tau: CenteredClip's tau (None: mean), for the true residual reported in the explanation
    :param accused_result: the result statement the accusation carries (what the accuser received). Pass
      it: a reducer that shows a result other than that one signed two results for one chunk (and could
      otherwise show an honest reduction for the bad aggregate it sent)
    :param projection_rtol: how far a published projection may be from the recomputed one, relative to
      it (plus 1e-9 * ||x_i - v||). Both sides compute the same float64 sums of the same bytes, so the
      default is tight: a liar's slack moves the projection check's residual by about projection_rtol per
      lying sender, which must stay far below its tolerance (`CHECK_TOLERANCE`, 1e-4).

    Rules, in order: the result statement must be the reducer's and cover `aggregate`; each sender it
    lists must have a part whose statement and commitment (both that sender's) match the part's bytes;
    reducing those parts must give `aggregate`. Any failure: the reducer is guilty (it must keep the
    evidence of what it reduced). Then a sender whose published projection differs from the recomputed
    one is guilty of lying. Otherwise everyone is consistent: (None, why), even when the true projections
    fail the check (a reduction that did not converge is what the round's reducer computes, not a lie).
    """
    try:
        result = expect(result_statement, signer=reducer_id, kind="result")
    except InvalidStatement as e:
        return reducer_id, f"its result statement is not valid: {e}"
    prefix, step, chunk = result.get("prefix"), result.get("step"), result.get("chunk")
    if not (isinstance(prefix, str) and isinstance(step, int) and isinstance(chunk, int) and chunk >= 0):
        return reducer_id, "its result statement names no prefix, step or chunk"
    if accused_result is not None:
        fields = {name: result.get(name) for name in ("prefix", "step", "group", "chunk")}
        try:
            received = expect(accused_result, signer=reducer_id, kind="result", **fields)
        except InvalidStatement as e:
            return None, f"the accusation does not carry the reducer's result for chunk {chunk}: {e}"
        if received != result:
            return reducer_id, f"signed two different results for chunk {chunk} at step {step}"
    if result.get("hash") != digest(part_bytes(aggregate)):
        return reducer_id, f"the aggregate it showed for chunk {chunk} is not the one it signed"
    senders = result.get("senders")
    if (
        not isinstance(senders, list)
        or not senders
        or not all(isinstance(sender, str) for sender in senders)
        or len(set(senders)) != len(senders)
    ):
        return reducer_id, f"its result for chunk {chunk} lists no senders or a sender twice"

    held = {sender: (tensor, statement) for sender, tensor, statement in parts}
    tensors = []
    for sender in senders:
        if sender not in held or sender not in commits:
            return reducer_id, f"kept no evidence of {sender}'s part {chunk}"
        tensor, statement = held[sender]
        try:
            commit = expect(commits[sender], signer=sender, kind="commit", prefix=prefix, step=step)
            parts = expect(statement, signer=sender, kind="parts", prefix=prefix, step=step)
            committed = commit["chunks"][chunk]
        except (InvalidStatement, KeyError, IndexError, TypeError) as e:
            return reducer_id, f"kept no valid statements for {sender}'s part {chunk}: {e}"
        if not part_hash(parts, chunk) == committed == digest(part_bytes(tensor)):
            return reducer_id, f"kept a part {chunk} of {sender} other than the one {sender} signed"
        tensors.append(tensor)

    try:
        expected = reduce(torch.stack(tensors))
        same = expected.shape == aggregate.shape and torch.allclose(
            expected.detach().cpu().double(), aggregate.detach().cpu().double(), rtol=rtol, atol=atol
        )
    except Exception as e:
        return reducer_id, f"the parts it kept for chunk {chunk} do not reduce: {e!r}"
    if not same:
        return reducer_id, f"its aggregate of chunk {chunk} is not the reduction of the parts it kept"

    z = projection_vector(seed, chunk, aggregate.numel())
    true_values = [project(tensor, aggregate, z) for tensor in tensors]
    for sender, (s, n) in zip(senders, true_values, strict=True):
        if sender not in projections:
            continue
        try:
            published_s, published_n = (float(value) for value in projections[sender])
        except (TypeError, ValueError):
            return sender, f"published a malformed projection of chunk {chunk}"
        floor = 1e-9 * n
        if not (
            abs(published_s - s) <= projection_rtol * abs(s) + floor
            and abs(published_n - n) <= projection_rtol * n + floor
        ):
            return sender, (
                f"published a false projection of chunk {chunk}: "
                f"({published_s:.6g}, {published_n:.6g}) instead of ({s:.6g}, {n:.6g})"
            )
    residual = fixed_point_residual(true_values, tau)
    explanation = (
        f"the aggregate of chunk {chunk} is the reduction of the committed parts and every published "
        f"projection is true (true residual {residual:.2e})"
    )
    if not check_chunk(true_values, tau, aggregate_norm=float(aggregate.detach().double().norm())):
        # nobody lied, yet the chunk fails on the true values: the reduction stopped short of its fixed
        # point. The accuser saw a real failure: nobody is to blame (GOOD_FAITH), nobody is banned
        return GOOD_FAITH, explanation + ": the reduction did not converge, which is nobody's fault"
    return None, explanation


class BanList:
    """Judges accusations (each distinct one once) and keeps the bans they lead to.

    :param recheck: settles "bad_aggregate" accusations (see `judge`); None leaves them undecided
    """

    def __init__(self, recheck: Recheck | None = None):
        self.recheck = recheck
        self._judged: set[bytes] = set()
        self._bans: dict[str, Verdict] = {}

    async def consider(self, blob: bytes) -> Verdict | None:
        """Judge an accusation not seen before; returns the verdict if it bans someone new, else None.

        If `recheck` raises, the exception propagates and the accusation will be judged again next time.
        """
        if not isinstance(blob, bytes):
            return None
        key = digest(blob)
        if key in self._judged:
            return None
        verdict = await judge(blob, self.recheck)
        self._judged.add(key)
        if verdict is None or verdict.guilty in self._bans:
            return None
        self._bans[verdict.guilty] = verdict
        logger.warning("banned %s: %s", verdict.guilty, verdict.reason)
        return verdict

    def banned(self) -> set[str]:
        return set(self._bans)

    def bans(self) -> list[Verdict]:
        """One verdict per banned peer: the first that banned it."""
        return list(self._bans.values())

    def is_banned(self, peer_id: str) -> bool:
        return peer_id in self._bans
