"""The client's side of refereed verification over hivemind P2P: commit a forward on nodes, and referee a
dispute between two of them (swarm.verification.dispute) by asking each the same questions by RPC.

A party that errs, does not answer within the timeout, or answers malformed (wrong refs, bad digests,
tensors that do not decode within the limits) forfeits its round; answers that decode but fail their
proofs are judged by the Dispute itself (bad_proof, contradiction, bad_tensor).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping

import torch
from hivemind.p2p import P2P

from swarm.client.errors import RemoteError
from swarm.models.span import LlamaSpan
from swarm.proto import swarm_pb2
from swarm.protocol import MAX_UNARY_MESSAGE_BYTES, VerificationProtocol
from swarm.utils.tensors import FLOAT_DTYPES, deserialize_checked, serialize
from swarm.verification.dispute import PARTIES, Answer, Dispute, Question, Verdict
from swarm.verification.merkle import DIGEST_SIZE, SpanCommitment
from swarm.verification.verdicts import check_commit_signature, index_digest, open_commit

logger = logging.getLogger(__name__)

MAX_PROOF_NODES = 64  # deeper than any tree of a span's operator outputs


async def remote_commit(
    p2p: P2P,
    peer_id: str,
    request_id: str,
    start: int,
    end: int,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    timeout: float,
    signatures: list[bytes] | None = None,
) -> tuple[SpanCommitment, torch.Tensor]:
    """Run blocks [start, end) of `peer_id` on the input with every operator traced; the node keeps the trace
    under `request_id` for disputes. Returns its commitment and output; raises RemoteError on an error reply
    or a malformed one.

    `signatures`: if given, the node's signed statement over its commitment is appended (what a published
    verdict needs, swarm.verification.verdicts); a reply without one signed by `peer_id` over this
    commitment, mask and positions is then malformed.
    """
    request = swarm_pb2.CommitRequest(
        request_id=request_id,
        start_block=start,
        end_block=end,
        tensors=[serialize(hidden_states)],
        attention_mask=serialize(attention_mask) if attention_mask is not None else None,
        position_ids=serialize(position_ids) if position_ids is not None else None,
    )
    response = await VerificationProtocol.stub(p2p, peer_id).rpc_commit(request, timeout=timeout)
    if response.HasField("error"):
        raise RemoteError(peer_id, response.error)
    try:
        commitment = SpanCommitment.from_dict(json.loads(response.commitment))
        if (commitment.start, commitment.end) != (start, end) or len(response.tensors) != 1:
            raise ValueError(
                f"a commitment to [{commitment.start}, {commitment.end}) with {len(response.tensors)} outputs"
            )
        output = deserialize_checked(
            response.tensors[0],
            name="output",
            allowed_dtypes=FLOAT_DTYPES,
            ndim=3,
            max_bytes=MAX_UNARY_MESSAGE_BYTES,
        )
        if output.shape != hidden_states.shape:
            raise ValueError(f"output of shape {tuple(output.shape)} for input {tuple(hidden_states.shape)}")
        if signatures is not None:
            _check_signature(peer_id, response.signature, commitment, attention_mask, position_ids)
    except Exception as e:
        raise RemoteError(peer_id, swarm_pb2.Error(message=f"malformed commit reply: {e}")) from None
    if signatures is not None:
        signatures.append(response.signature)
    return commitment, output


def _check_signature(
    peer_id: str,
    blob: bytes,
    commitment: SpanCommitment,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> None:
    """The node signed this commitment on the mask and positions it was sent (raises ValueError)."""
    if not blob:
        raise ValueError("the node did not sign its commitment")
    signer = check_commit_signature(blob, commitment)
    if signer != peer_id:
        raise ValueError(f"the commitment is signed by {signer}")
    claim, sent = open_commit(blob), (index_digest(attention_mask), index_digest(position_ids))
    if (claim.attention_mask, claim.position_ids) != sent:
        raise ValueError("the node signed another attention mask or positions than it was sent")


async def ask_node(p2p: P2P, peer_id: str, request: swarm_pb2.DisputeQuestionRequest, timeout: float):
    """One dispute round with a serving node (VerificationProtocol)."""
    return await VerificationProtocol.stub(p2p, peer_id).rpc_dispute_answer(request, timeout=timeout)


class RemoteParty:
    """A dispute party answering by RPC about the trace it keeps under `request_id` (async Responder).

    `rpc` sends one question (default: to a serving node; training disputes ask stage peers instead).
    """

    def __init__(
        self,
        p2p: P2P,
        peer_id: str,
        request_id: str,
        timeout: float,
        rpc: Callable[..., Awaitable[swarm_pb2.DisputeAnswerResponse]] = ask_node,
    ):
        self.p2p, self.peer_id, self.request_id, self.timeout = p2p, peer_id, request_id, timeout
        self.rpc = rpc
        self.wire_bytes = 0  # serialized questions and answers, as sent over the wire
        self.failure: str | None = None  # why it forfeited, if it did

    async def respond(self, question: Question) -> Answer | None:
        """The party's answer, or None (it forfeits) on an error reply, a timeout or a malformed answer."""
        request = swarm_pb2.DisputeQuestionRequest(
            request_id=self.request_id, round=question.round, refs=question.refs, tensors=question.tensors
        )
        self.wire_bytes += request.ByteSize()
        try:
            response = await asyncio.wait_for(
                self.rpc(self.p2p, self.peer_id, request, self.timeout), self.timeout
            )
            self.wire_bytes += response.ByteSize()
            if response.HasField("error"):
                raise RemoteError(self.peer_id, response.error)
            return decode_answer(question, response)
        except Exception as e:  # silence, refusal or garbage: the party loses the round either way
            self.failure = f"{type(e).__name__}: {e}"
            logger.info("party %s forfeits round %d: %s", self.peer_id, question.round, self.failure)
            return None


def decode_answer(question: Question, response: swarm_pb2.DisputeAnswerResponse) -> Answer:
    """The Answer in a reply, refusing anything malformed (ValueError)."""
    refs = tuple(response.refs)
    if refs != question.refs:
        raise ValueError(f"answered refs {refs}, asked {question.refs}")
    answer = Answer()
    if question.tensors:
        if len(response.tensors) != len(refs) or response.digests or response.proofs:
            raise ValueError("a tensor answer needs one tensor per ref and nothing else")
        for ref, proto in zip(refs, response.tensors, strict=True):
            answer.tensors[ref] = deserialize_checked(
                proto,
                name=f"ref {ref}",
                allowed_dtypes=FLOAT_DTYPES,
                ndim=None,
                max_bytes=MAX_UNARY_MESSAGE_BYTES,
            )
        return answer
    if len(response.digests) != len(refs) or len(response.proofs) != len(refs) or response.tensors:
        raise ValueError("a digest answer needs one digest and one proof per ref and nothing else")
    for ref, digest, proof in zip(refs, response.digests, response.proofs, strict=True):
        if (
            len(digest) != DIGEST_SIZE
            or len(proof) % DIGEST_SIZE
            or len(proof) > MAX_PROOF_NODES * DIGEST_SIZE
        ):
            raise ValueError(f"ref {ref}: malformed digest or proof")
        answer.digests[ref] = bytes(digest)
        answer.proofs[ref] = tuple(
            bytes(proof[i : i + DIGEST_SIZE]) for i in range(0, len(proof), DIGEST_SIZE)
        )
    return answer


async def play_dispute(dispute: Dispute, parties: Mapping[str, RemoteParty]) -> Verdict:
    """Play `dispute` to the end, asking both parties each question concurrently; None answers forfeit."""
    while (question := dispute.next_question()) is not None:
        answers = await asyncio.gather(*(parties[name].respond(question) for name in PARTIES))
        for name, answer in zip(PARTIES, answers, strict=True):
            if answer is None:
                dispute.forfeit(name)
            else:
                dispute.answer(name, answer)
    return dispute.verdict()


async def run_remote_dispute(
    p2p: P2P,
    peer_a: str,
    peer_b: str,
    span: LlamaSpan,
    commitment_a: SpanCommitment,
    commitment_b: SpanCommitment,
    request_id: str,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    timeout: float = 30.0,
    request_id_b: str | None = None,
) -> tuple[Verdict, dict[str, RemoteParty]]:
    """Referee a dispute between the traces `peer_a` and `peer_b` keep under `request_id` (peer b's under
    `request_id_b` if given) and committed to with `commitment_a` / `commitment_b`.

    `span` holds the referee's weights for the committed blocks (it recomputes one operator of one of them);
    the mask and positions are the disputed forward's. Returns the verdict ("a" is peer_a) and the parties,
    whose `wire_bytes` and `failure` tell what went over the wire and why a party forfeited.
    """
    dispute = Dispute(
        commitment_a, commitment_b, span, attention_mask=attention_mask, position_ids=position_ids
    )
    parties = {
        "a": RemoteParty(p2p, peer_a, request_id, timeout),
        "b": RemoteParty(p2p, peer_b, request_id_b or request_id, timeout),
    }
    return await play_dispute(dispute, parties), parties
