"""Framing an honest peer with a false verdict: the attack behind `--fault frame` (swarm.testing.faults).

A node that wants an honest competitor banned builds the strongest false verdict it can from real parts:

1. it finds a peer serving blocks that overlap its own (from the DHT, as a client does) and asks it, with a
   legitimate `rpc_commit`, for a signed commitment to a forward of the blocks they share;
2. it traces the same forward itself twice: honestly (which must reproduce the victim's commitment bit for
   bit: both run the deterministic profile) and with one operator of the chosen block off by an ulp (more,
   if one ulp does not reach the span's output), and signs the lie with its own key;
3. it referees the dispute between the two locally (the victim's part answered from the honest trace, which
   the victim's signed root vouches for), which convicts the lie;
4. it publishes that verdict's record under its own DHT key with the losers swapped: the victim, for a
   "wrong_output" at that block and operator.

Every signature, root, proof and input in the record is genuine, so the record passes every check short of
the recomputation; recomputing the one operator (what every client does before it honours a verdict) shows
that the victim's committed output is the right one and the record's losers are not the ones it proves, so
the author is banned instead (swarm.verification.verdicts.VerdictBook).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from hivemind.utils.crypto import RSAPrivateKey

from swarm.dht.swarm_view import read_swarm
from swarm.models.span import LlamaSpan
from swarm.proto import swarm_pb2
from swarm.verification.determinism import referee_profile
from swarm.verification.dispute import Dispute, HonestParty, Question, run_dispute
from swarm.verification.merkle import SpanCommitment, commit_trace
from swarm.verification.remote import remote_commit
from swarm.verification.service import sub_span
from swarm.verification.trace import perturb_operator, trace_span
from swarm.verification.verdicts import make_verdict_record, publish_verdict, sign_commitment

if TYPE_CHECKING:
    from swarm.testing.faults import ServingNode

logger = logging.getLogger(__name__)

FRAME_ATTEMPTS = 20  # tries before giving up (no victim visible yet, a victim that did not commit, ...)
FRAME_RETRY_S = 2.0  # between tries: about the time a peer that just started needs to announce itself
FRAME_TIMEOUT_S = 30.0  # for each DHT read or write and for the victim's commit
FRAMED_OP = "down_proj"  # the operator the false claim is about
LIE_ULPS = (1, 64, 4096)  # how far the local lie moves FRAMED_OP's output: the first that shows wins
PROBE_TOKENS = 6  # the forward the victim commits to: one sequence of this many random hidden states
PROBE_SEED = 20240917
FRAMED_VERDICT_LIFETIME_S = 3600.0  # seconds the false verdict stays in the DHT


class FramingFailed(RuntimeError):
    """This attempt could not build a false verdict (the victim computes differently, say)."""


def overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    """The blocks [start, end) that spans `a` and `b` share, or None."""
    start, end = max(a[0], b[0]), min(a[1], b[1])
    return (start, end) if start < end else None


def pick_victim(
    servers: Mapping[str, swarm_pb2.ServerInfo],
    own_peer_id: str,
    own_span: tuple[int, int],
    block: int | None,
    profile: Mapping[str, str],
) -> swarm_pb2.ServerInfo | None:
    """An ONLINE peer other than this one whose span overlaps `own_span` (on `block`, if given); one that
    announces this node's determinism profile if there is one (its bytes can be reproduced here). Of several,
    the lowest peer id, so that repeated tries aim at the same victim."""
    candidates = []
    for info in servers.values():
        shared = overlap(own_span, (info.start_block, info.end_block))
        if info.peer_id == own_peer_id or info.state != swarm_pb2.ServerInfo.ONLINE or shared is None:
            continue
        if block is None or shared[0] <= block < shared[1]:
            candidates.append(info)
    same_profile = [info for info in candidates if dict(info.determinism) == dict(profile)]
    pool = same_profile or candidates
    return min(pool, key=lambda info: info.peer_id) if pool else None


def probe_input(hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The forward the victim is asked to commit to: reproducible, so every try disputes the same one."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randn(1, PROBE_TOKENS, hidden_size, generator=generator).to(dtype)


def forge_verdict(
    model: str,
    span: LlamaSpan,
    shared: tuple[int, int],
    block: int,
    hidden_states: torch.Tensor,
    victim: str,
    victim_commitment: SpanCommitment,
    victim_signature: bytes,
    own_peer_id: str,
    signing_key: RSAPrivateKey,
) -> swarm_pb2.VerdictRecord:
    """A verdict record convicting `victim` of a wrong FRAMED_OP output in `block`, built from the victim's
    real signed commitment to blocks `shared` on `hidden_states` (no mask, default positions) and a lie
    signed by this node (see the module's docstring).

    `span` holds this node's weights for `shared` (the served span: the caller runs this on the node's
    compute thread, since the lie hooks the span's modules for one trace).

    :raises FramingFailed: the victim's commitment is not the honest trace's, or the lie does not show
    """
    start, end = shared
    view = sub_span(span, slice(start - span.start, end - span.start))
    inputs = hidden_states.to(next(view.parameters()).device)
    honest = trace_span(view, inputs)
    if commit_trace(honest, view) != victim_commitment:
        raise FramingFailed(
            f"{victim} committed to something else than this node computes: can't answer for it"
        )
    # the smallest lie that reaches the span's output: a dispute needs the outputs to differ
    for ulps in LIE_ULPS:
        handle = perturb_operator(view, block - start, FRAMED_OP, ulps)
        try:
            lie = trace_span(view, inputs)
        finally:
            handle.remove()
        lie_commitment = commit_trace(lie, view)
        if lie_commitment.block_output_digests[-1] != victim_commitment.block_output_digests[-1]:
            break
    else:
        raise FramingFailed(
            f"moving block {block}'s {FRAMED_OP} by up to {ulps} ulps did not reach the output"
        )
    parties = {"a": HonestParty(honest, victim_commitment), "b": HonestParty(lie, lie_commitment)}
    verdict = run_dispute(Dispute(victim_commitment, lie_commitment, view), parties)
    if verdict.losers != ("b",) or verdict.evidence is None:
        raise FramingFailed(f"the local dispute did not convict the lie: {verdict.reasons}")
    refs = tuple(verdict.evidence.input_refs.values())
    fetched = parties["a"].respond(Question(verdict.rounds + 1, refs, tensors=True))
    record = make_verdict_record(
        model,
        verdict,
        parties={"a": victim, "b": own_peer_id},
        signed_commits={
            "a": victim_signature,
            "b": sign_commitment(signing_key, model, lie_commitment, None, None),
        },
        input_tensors={name: fetched.tensors[ref] for name, ref in verdict.evidence.input_refs.items()},
        attention_mask=None,
        position_ids=None,
        # the profile every honest client re-checks with: a record under another profile would be ignored
        profile=referee_profile(),
    )
    # the lie itself: the record proves this node wrong, and says the victim was
    del record.losers[:]
    record.losers.append(victim)
    record.reasons.clear()
    record.reasons[victim] = "wrong_output"
    return record


async def frame_once(
    node: ServingNode, block: int | None, timeout: float = FRAME_TIMEOUT_S
) -> swarm_pb2.VerdictRecord | None:
    """One try: the published false record, or None when no peer to frame is visible yet.

    :raises Exception: anything that made this try fail (the caller logs it and tries again)
    """
    backend = node.backend()
    own_span = (backend.span.start, backend.span.end)
    servers, _ = await asyncio.to_thread(read_swarm, node.dht, node.model, node.num_blocks, timeout)
    victim = pick_victim(servers, node.peer_id, own_span, block, node.determinism)
    if victim is None:
        return None
    shared = overlap(own_span, (victim.start_block, victim.end_block))
    claimed = shared[0] if block is None else block
    hidden_states = probe_input(backend.span.config.hidden_size, backend.dtype)
    signatures: list[bytes] = []
    # a legitimate request: any client may ask a node to commit to a forward
    commitment, _ = await remote_commit(
        node.p2p,
        victim.peer_id,
        uuid.uuid4().hex,
        *shared,
        hidden_states,
        None,
        None,
        timeout,
        signatures=signatures,
    )
    # on the compute thread: the lie hooks the served span's modules for one trace, no request may interleave
    record = await backend._run(
        forge_verdict,
        node.model,
        backend.span,
        shared,
        claimed,
        hidden_states,
        victim.peer_id,
        commitment,
        signatures[0],
        node.peer_id,
        node.signing_key,
    )
    stored = await asyncio.to_thread(
        publish_verdict,
        node.dht,
        node.model,
        record,
        FRAMED_VERDICT_LIFETIME_S,
        owner_public_key=node.owner_public_key,
        timeout=timeout,
    )
    if not stored:
        raise FramingFailed("the DHT did not take the record")
    logger.warning(
        "framed %s: published a false verdict that it computed block %d's %s wrong",
        victim.peer_id,
        claimed,
        FRAMED_OP,
    )
    return record


async def frame_a_peer(
    node: ServingNode,
    block: int | None = None,
    attempts: int = FRAME_ATTEMPTS,
    retry_s: float = FRAME_RETRY_S,
) -> swarm_pb2.VerdictRecord | None:
    """Frame one honest peer (see the module's docstring), trying up to `attempts` times `retry_s` apart;
    returns the published record, or None if it gave up. Never raises but on cancellation: the node it runs
    in keeps serving whatever happens here."""
    for attempt in range(1, attempts + 1):
        try:
            span = node.backend().span
            if block is not None and not span.start <= block < span.end:
                logger.error(
                    "--fault frame:block=%d is outside this node's span [%d, %d): not framing anyone",
                    block,
                    span.start,
                    span.end,
                )
                return None
            record = await frame_once(node, block)
        except Exception as e:
            logger.warning("framing, try %d of %d failed: %r", attempt, attempts, e)
        else:
            if record is not None:
                return record
            logger.info("framing, try %d of %d: no peer serves overlapping blocks yet", attempt, attempts)
        if attempt < attempts:
            await asyncio.sleep(retry_s)
    logger.warning("gave up framing after %d tries", attempts)
    return None
