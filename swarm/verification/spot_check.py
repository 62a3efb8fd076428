"""Client spot checks: give a span call's input to a second node as well, compare what both commit to, and
settle a disagreement with the dispute game, the client refereeing.

Only two nodes that announce the same deterministic profile can be compared bit for bit, and only a referee
with that profile can recompute the disputed operator; anything else is reported, and nobody is convicted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2P

from swarm.models.span import LlamaSpan
from swarm.proto import swarm_pb2
from swarm.verification.determinism import (
    deterministic_profile,
    is_deterministic,
    referee_profile,
    same_profile,
    server_profile,
)
from swarm.verification.dispute import PARTIES, Question, Verdict
from swarm.verification.remote import RemoteParty, remote_commit, run_remote_dispute
from swarm.verification.verdicts import make_verdict_record

logger = logging.getLogger(__name__)

REFEREE_SPANS_KEPT = 2  # the client's own copies of disputed spans, kept for the next dispute

# outputs of nodes with different profiles count as the same computation within this (relative) tolerance
PROFILE_TOLERANCE = 1e-3


# what a node served and what it committed to for the same input may differ by rounding only (a session's
# cached steps vs a forward of the whole prefix)
SERVED_TOLERANCE = 1e-3


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a| (a tiny floor keeps an all-zero `a` finite)."""
    return float((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-12))


@dataclass
class SpotCheck:
    """What one spot check found.

    outcome: "agreed" (same profile, identical commitments), "close"/"far" (different profiles: outputs
    within PROFILE_TOLERANCE or not; only reported), "no_second" (nobody else serves the span), "disputed"
    (a dispute was played: see verdict and convicted), "unrefereed" (the commitments differ but this client
    cannot recompute with the parties' profile), "failed" (the second node or the checked one did not commit).
    """

    peer_id: str
    start: int
    end: int
    outcome: str
    second: str | None = None
    verdict: Verdict | None = None
    convicted: tuple[str, ...] = ()
    output: torch.Tensor | None = None  # the span's output as the checked node (or the winner) committed
    max_difference: float | None = None
    detail: str = ""
    parties: dict[str, RemoteParty] = field(default_factory=dict)
    record: swarm_pb2.VerdictRecord | None = None  # the verdict as published, when it carries evidence

    def served_matches(self, served: torch.Tensor) -> bool:
        """Whether what the checked node served (its last positions) is what it committed to, up to
        rounding; True when there is no commitment to compare with."""
        if self.output is None or self.peer_id in self.convicted:
            return True
        committed = self.output[:, -served.shape[1] :]
        return relative_difference(committed, served) <= SERVED_TOLERANCE


class SpotChecker:
    """Decides which span calls to check (`verify_rate`) and checks them.

    :param load_referee_span: blocks [start, end) with the client's own copy of the weights, or None when the
      client has no blocks to recompute with
    :param model: the model's name in the DHT (commitments are signed for it; verdicts are about it)
    :param publish: called (off the event loop) with the record of each verdict settled by recomputation,
      for others to re-check (swarm.verification.verdicts.publish_verdict)
    """

    def __init__(
        self,
        p2p: P2P,
        verify_rate: float,
        load_referee_span: Callable[[int, int], LlamaSpan | None],
        timeout: float,
        rng: random.Random | None = None,
        model: str = "",
        publish: Callable[[swarm_pb2.VerdictRecord], object] | None = None,
    ):
        if not 0.0 <= verify_rate <= 1.0:
            raise ValueError(f"verify_rate must be within [0, 1], got {verify_rate}")
        self.p2p, self.verify_rate = p2p, verify_rate
        self.load_referee_span, self.timeout = load_referee_span, timeout
        self.model, self.publish = model, publish
        self.rng = rng or random.Random()
        self.history: list[SpotCheck] = []  # every check's result, oldest first
        self._dispute_lock: asyncio.Lock | None = None  # made on the client's loop, at the first dispute
        self._referee_spans: OrderedDict[tuple[int, int], LlamaSpan | None] = OrderedDict()

    def should_check(self) -> bool:
        """Draw whether the next span call is checked."""
        return self.verify_rate > 0 and self.rng.random() < self.verify_rate

    async def check(
        self,
        info: swarm_pb2.ServerInfo,
        start: int,
        end: int,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        servers: list[swarm_pb2.ServerInfo],
    ) -> SpotCheck:
        """Run blocks [start, end) on `info`'s node and on a second one (picked among `servers`, the nodes a
        route may use now) with every operator committed, and compare. A disagreement between same-profile
        nodes is disputed and its losers are `convicted`."""
        peer_id = info.peer_id
        second = self._pick_second(info, start, end, servers)
        if second is None:
            return self._record(SpotCheck(peer_id, start, end, "no_second"))
        request_id = uuid.uuid4().hex
        # each node's signed statement over its commitment: what lets a verdict prove the lie is the node's
        signatures: dict[str, list[bytes]] = {peer_id: [], second.peer_id: []}
        replies = await asyncio.gather(
            *(
                remote_commit(
                    self.p2p,
                    node,
                    request_id,
                    start,
                    end,
                    hidden_states,
                    attention_mask,
                    position_ids,
                    self.timeout,
                    signatures=signatures[node],
                )
                for node in (peer_id, second.peer_id)
            ),
            return_exceptions=True,
        )
        result = SpotCheck(peer_id, start, end, "failed", second=second.peer_id)
        failed = [
            (node, reply)
            for node, reply in zip((peer_id, second.peer_id), replies, strict=True)
            if isinstance(reply, BaseException)
        ]
        if failed:
            result.detail = "; ".join(f"{node} did not commit: {reply!r}" for node, reply in failed)
            if isinstance(replies[0], tuple):
                result.output = replies[0][1]
            return self._record(result)
        (commitment_a, output_a), (commitment_b, output_b) = replies
        result.output = output_a
        profile = server_profile(info)
        comparable = is_deterministic(profile) and same_profile(profile, server_profile(second))
        if not comparable:
            result.max_difference = relative_difference(output_a, output_b)
            result.outcome = "close" if result.max_difference <= PROFILE_TOLERANCE else "far"
            return self._record(result)
        if commitment_a.block_output_digests[-1] == commitment_b.block_output_digests[-1]:
            result.outcome = "agreed"
            return self._record(result)
        if commitment_a.input_digest != commitment_b.input_digest:
            # one of them committed to an input it was not sent: nothing to bisect, and no proof of who
            result.detail = "the nodes committed to different inputs"
            return self._record(result)
        referee = await self._referee_span(start, end, profile)
        if referee is None:
            result.outcome = "unrefereed"
            result.detail = "this client cannot recompute with the parties' profile or lacks the blocks"
            return self._record(result)
        if self._dispute_lock is None:
            self._dispute_lock = asyncio.Lock()
        try:
            # one dispute at a time: the profile is process-wide, and nested ones would restore it wrongly
            async with self._dispute_lock:
                with deterministic_profile():
                    verdict, parties = await run_remote_dispute(
                        self.p2p,
                        peer_id,
                        second.peer_id,
                        referee,
                        commitment_a,
                        commitment_b,
                        request_id,
                        attention_mask,
                        position_ids,
                        self.timeout,
                    )
        except Exception as e:  # a malformed commitment, say: the check fails, nobody is blamed for it
            result.detail = f"the dispute could not be played: {e!r}"
            return self._record(result)
        names = {"a": peer_id, "b": second.peer_id}
        result.outcome, result.verdict, result.parties = "disputed", verdict, parties
        result.convicted = tuple(names[party] for party in verdict.losers)
        if peer_id in result.convicted and second.peer_id not in result.convicted:
            result.output = output_b
        if verdict.evidence is not None and result.convicted:
            signed = {"a": signatures[peer_id][0], "b": signatures[second.peer_id][0]}
            result.record = await self._record_verdict(
                verdict, parties, names, signed, attention_mask, position_ids
            )
        logger.warning(
            "spot check of blocks [%d, %d): %s and %s disagreed; convicted %s (block %s, %s)",
            start,
            end,
            peer_id,
            second.peer_id,
            list(result.convicted),
            None if verdict.block is None else verdict.first_block + verdict.block,
            verdict.op,
        )
        return self._record(result)

    async def _record_verdict(self, verdict, parties, names, signed, attention_mask, position_ids):
        """The verdict as a DHT record, published if this checker publishes; None if it can't be built (the
        conviction stands here either way)."""
        winner = next(party for party in PARTIES if party not in verdict.losers)
        refs = tuple(verdict.evidence.input_refs.values())
        try:
            # the operator's inputs, once more from the winner (the game proved both parties agree on them)
            fetched = await parties[winner].respond(Question(verdict.rounds + 1, refs, tensors=True))
            if fetched is None:
                raise ValueError(f"{names[winner]} did not send the operator's inputs")
            inputs = {name: fetched.tensors[ref] for name, ref in verdict.evidence.input_refs.items()}
            record = make_verdict_record(
                self.model,
                verdict,
                names,
                signed,
                inputs,
                attention_mask,
                position_ids,
                profile=self.referee_profile(),
            )
            if self.publish is not None:
                await asyncio.to_thread(self.publish, record)
            return record
        except Exception as e:
            logger.warning("the verdict against %s was not published: %r", list(verdict.losers), e)
            return None

    def _pick_second(
        self, info: swarm_pb2.ServerInfo, start: int, end: int, servers: list[swarm_pb2.ServerInfo]
    ) -> swarm_pb2.ServerInfo | None:
        """Another node serving all of [start, end): one with the same profile if there is one."""
        # never a node of other weights (--quant): a quantized node's output differs from a full-precision
        # one's by design, so comparing them would judge nothing
        candidates = [
            s
            for s in servers
            if s.peer_id != info.peer_id
            and s.start_block <= start
            and end <= s.end_block
            and (s.quant or "none") == (info.quant or "none")
        ]
        profile = server_profile(info)
        same = [s for s in candidates if same_profile(server_profile(s), profile)]
        pool = same or candidates
        return self.rng.choice(pool) if pool else None

    def referee_profile(self) -> dict[str, str]:
        """The profile this client recomputes operators with (fp32 on CPU, deterministic)."""
        return referee_profile()

    async def _referee_span(self, start: int, end: int, profile: dict[str, str]) -> LlamaSpan | None:
        """The client's own blocks [start, end), if it can recompute them bit for bit as the parties do."""
        if not same_profile(self.referee_profile(), profile):
            return None
        key = (start, end)
        if key not in self._referee_spans:
            # read from disk off the event loop, which carries every other call of this client
            self._referee_spans[key] = await asyncio.to_thread(self.load_referee_span, start, end)
            while len(self._referee_spans) > REFEREE_SPANS_KEPT:
                self._referee_spans.popitem(last=False)
        self._referee_spans.move_to_end(key)
        return self._referee_spans[key]

    def _record(self, result: SpotCheck) -> SpotCheck:
        self.history.append(result)
        if result.outcome in ("far", "failed", "unrefereed"):
            logger.warning(
                "spot check of %s on blocks [%d, %d): %s %s",
                result.peer_id,
                result.start,
                result.end,
                result.outcome,
                result.detail,
            )
        return result
