"""The node's side of refereed verification: commit to traced forwards and answer disputes about them.

rpc_commit runs the span with every operator traced (trace_span), keeps the trace in a small bounded store
under the client's request id, and returns the commitment and the output, with the node's signed statement
over the commitment (swarm.verification.verdicts.sign_commitment) when it has a key; rpc_dispute_answer
answers a dispute question about a kept trace exactly as HonestParty does. A node with a fault on its span
(e.g. `--fault perturb:...`) traces, commits and answers with what it really computed: the lie included.
Tensor work runs on the backend's compute thread, so it never interleaves with other requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hivemind.p2p import P2PContext
from hivemind.utils.crypto import RSAPrivateKey

from swarm.models.span import LlamaSpan
from swarm.node.backend import SpanBackend, SpanInputs
from swarm.node.compute import VERIFY
from swarm.node.errors import RequestError, error_reply
from swarm.proto import swarm_pb2
from swarm.protocol import MAX_UNARY_MESSAGE_BYTES, VerificationProtocol
from swarm.utils.tensors import TensorTooLargeError, serialize
from swarm.verification.dispute import SPAN_INPUT, Answer, HonestParty, Question
from swarm.verification.merkle import commit_trace, operator_digests
from swarm.verification.trace import OPERATORS, SpanTrace, UntraceableModel, check_traceable, trace_span
from swarm.verification.verdicts import sign_commitment

logger = logging.getLogger(__name__)

MAX_REQUEST_ID_LENGTH = 128
SILENT_FOR = 300.0  # how long a silent party (a fault) holds a question: longer than any referee waits
MAX_KEPT_TRACES = 8
MAX_KEPT_BYTES = 256 * 1024 * 1024
TRACE_TTL = 600.0  # seconds a trace is kept for disputes after its commit
ENVELOPE_BYTES = 64 * 1024  # room left in a unary reply for everything but tensor buffers


def trace_nbytes(trace: SpanTrace) -> int:
    tensors = [trace.input, trace.output] + [tensor for block in trace.blocks for _, tensor in block]
    return sum(t.numel() * t.element_size() for t in tensors)


def estimate_trace_nbytes(config, blocks: int, tokens: int, element_size: int) -> int:
    """What trace_span will keep for `blocks` blocks of `tokens` (batch x sequence) tokens: checked before
    any of it is allocated."""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    # per block: 6 operators of hidden size, q and attention, k and v, gate, up and act_mul
    per_block = 6 * hidden + 2 * q + 2 * kv + 3 * intermediate
    return (blocks * per_block + 2 * hidden) * tokens * element_size


@dataclass
class _Kept:
    party: HonestParty
    nbytes: int
    expires: float


class TraceStore:
    """Traces kept for disputes: at most `max_traces` and `max_bytes`, oldest evicted first, for `ttl` s."""

    def __init__(
        self,
        max_traces: int = MAX_KEPT_TRACES,
        max_bytes: int = MAX_KEPT_BYTES,
        ttl: float = TRACE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_traces, self.max_bytes, self.ttl, self.clock = max_traces, max_bytes, ttl, clock
        self._kept: OrderedDict[str, _Kept] = OrderedDict()

    def __len__(self) -> int:
        self._expire()
        return len(self._kept)

    @property
    def nbytes(self) -> int:
        self._expire()
        return sum(kept.nbytes for kept in self._kept.values())

    def check_fits(self, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            raise TensorTooLargeError(
                f"the trace would take {nbytes} bytes; this node keeps at most {self.max_bytes}"
            )

    def put(self, request_id: str, party: HonestParty, nbytes: int) -> None:
        """Keep `party` under `request_id` (replacing a trace kept under it), evicting the oldest to fit."""
        self.check_fits(nbytes)
        self._expire()
        self._kept.pop(request_id, None)
        while self._kept and (len(self._kept) >= self.max_traces or self.nbytes + nbytes > self.max_bytes):
            self._kept.popitem(last=False)
        self._kept[request_id] = _Kept(party, nbytes, self.clock() + self.ttl)

    def get(self, request_id: str) -> HonestParty:
        self._expire()
        kept = self._kept.get(request_id)
        if kept is None:
            raise RequestError(
                swarm_pb2.Error.UNKNOWN_SESSION,
                f"no trace is kept under request id {request_id!r} (never committed, expired or evicted)",
            )
        return kept.party

    def _expire(self) -> None:
        now = self.clock()
        for request_id in [rid for rid, kept in self._kept.items() if kept.expires <= now]:
            del self._kept[request_id]


def sub_span(span: LlamaSpan, layers: slice) -> LlamaSpan:
    """A view of `span`'s layers[layers] as a span of its own (same modules, so hooks on them apply)."""
    first, stop, _ = layers.indices(len(span.layers))
    if (first, stop) == (0, len(span.layers)):
        return span
    return span.view(first, stop)


def _trace_block(
    span: LlamaSpan,
    layer: int,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    positions: torch.Tensor | None,
) -> tuple[SpanTrace, list[bytes]]:
    """One block of a commitment's trace, and its operator digests."""
    trace = trace_span(sub_span(span, slice(layer, layer + 1)), hidden, mask, positions)
    return trace, operator_digests(trace)


def trace_key(context: P2PContext, request_id: str) -> str:
    """Traces are kept per caller: another peer that learns a request id can neither read nor replace it."""
    return f"{context.remote_id.to_base58()}/{request_id}"


def check_request_id(request_id: str) -> str:
    if not 0 < len(request_id) <= MAX_REQUEST_ID_LENGTH:
        raise RequestError(
            swarm_pb2.Error.BAD_REQUEST, f"request_id must have 1 to {MAX_REQUEST_ID_LENGTH} characters"
        )
    return request_id


class VerificationServicer(VerificationProtocol):
    """The node's side of VerificationProtocol, over whichever backend the node serves now.

    :param signing_key: the node's identity key (the one its DHT records use); it signs every commitment,
        so that a verdict can prove what this node committed to. None leaves replies unsigned.
    :param model: the model's name in the DHT, named in the signed statements
    :param answer_dispute: a fault's hook over each dispute answer (None: stay silent); honest by default
    """

    def __init__(
        self,
        get_backend: Callable[[], SpanBackend],
        store: TraceStore | None = None,
        signing_key: RSAPrivateKey | None = None,
        model: str = "",
        answer_dispute: Callable[[Answer], Answer | None] = lambda answer: answer,
    ):
        self.get_backend = get_backend
        self.store = store if store is not None else TraceStore()
        self.signing_key, self.model = signing_key, model
        self.answer_dispute = answer_dispute

    async def rpc_commit(
        self, request: swarm_pb2.CommitRequest, context: P2PContext
    ) -> swarm_pb2.CommitResponse:
        try:
            request_id = check_request_id(request.request_id)
            backend = self.get_backend()
            try:
                check_traceable(backend.span.config)
            except UntraceableModel as e:
                raise RequestError(swarm_pb2.Error.BAD_REQUEST, str(e)) from None
            if len(request.tensors) != 1:
                raise RequestError(
                    swarm_pb2.Error.BAD_REQUEST,
                    f"expected 1 tensor (hidden_states), got {len(request.tensors)}",
                )
            inputs = backend.parse_inputs(
                request.start_block,
                request.end_block,
                list(request.tensors),
                request.attention_mask if request.HasField("attention_mask") else None,
                request.position_ids if request.HasField("position_ids") else None,
            )
            batch, seq_len, _ = inputs.hidden_states.shape
            blocks = inputs.layers.stop - inputs.layers.start
            element_size = torch.empty((), dtype=backend.dtype).element_size()
            self.store.check_fits(
                estimate_trace_nbytes(backend.span.config, blocks, batch * seq_len, element_size)
            )
            party, output, nbytes = await self._commit(backend, inputs)
            commitment = json.dumps(party.commitment.to_dict()).encode()
            response = swarm_pb2.CommitResponse(commitment=commitment, tensors=[serialize(output)])
            if self.signing_key is not None:
                # over the mask and positions as the trace used them: a verdict must show the same ones
                response.signature = sign_commitment(
                    self.signing_key, self.model, party.commitment, inputs.attention_mask, inputs.position_ids
                )
            if response.ByteSize() > MAX_UNARY_MESSAGE_BYTES:
                raise RequestError(swarm_pb2.Error.TOO_LARGE, "the output exceeds the unary message limit")
            self.store.put(trace_key(context, request_id), party, nbytes)
            return response
        except Exception as e:
            return error_reply(swarm_pb2.CommitResponse, e, context, "commit", logger)

    @staticmethod
    async def _commit(backend: SpanBackend, inputs: SpanInputs) -> tuple[HonestParty, torch.Tensor, int]:
        """Trace and commit, one block per job on the compute thread: a request that arrives meanwhile waits
        for one block's trace at most, not the whole span's (the checked node is on the client's route)."""
        hidden = inputs.hidden_states.to(backend.device, backend.dtype)
        mask = inputs.attention_mask.to(backend.device) if inputs.attention_mask is not None else None
        positions = inputs.position_ids.to(backend.device) if inputs.position_ids is not None else None
        pieces, leaves = [], []
        for layer in range(inputs.layers.start, inputs.layers.stop):
            piece, digests = await backend._run(
                _trace_block, backend.span, layer, hidden, mask, positions, priority=VERIFY
            )
            pieces.append(piece)
            leaves.extend(digests)
            hidden = piece.output
        trace = SpanTrace(
            input=pieces[0].input, blocks=[piece.blocks[0] for piece in pieces], output=pieces[-1].output
        )
        span = sub_span(backend.span, inputs.layers)
        # the weights' digests are hashed once per span and remembered: the first commit pays for them
        commitment = await backend._run(commit_trace, trace, span, leaves, priority=VERIFY)
        party = HonestParty(trace, commitment, leaves)
        return party, trace.output.to("cpu", inputs.wire_dtype), trace_nbytes(trace)

    async def rpc_dispute_answer(
        self, request: swarm_pb2.DisputeQuestionRequest, context: P2PContext
    ) -> swarm_pb2.DisputeAnswerResponse:
        try:
            party = self.store.get(trace_key(context, check_request_id(request.request_id)))
            refs = tuple(request.refs)
            num_leaves = party.commitment.num_leaves
            if not 0 < len(refs) <= num_leaves + 1 or len(set(refs)) != len(refs):
                raise RequestError(
                    swarm_pb2.Error.BAD_REQUEST, f"a question names 1 to {num_leaves + 1} distinct refs"
                )
            if bad := [ref for ref in refs if not SPAN_INPUT <= ref < num_leaves]:
                raise RequestError(
                    swarm_pb2.Error.BAD_REQUEST,
                    f"refs {bad} are outside the trace's {num_leaves} operator outputs",
                )
            if request.tensors:
                nbytes = sum(_tensor_nbytes(party.trace, ref) for ref in refs)
                if nbytes > MAX_UNARY_MESSAGE_BYTES - ENVELOPE_BYTES:
                    raise RequestError(
                        swarm_pb2.Error.TOO_LARGE, f"{nbytes} bytes of tensors exceed the unary message limit"
                    )
            question = Question(request.round, refs, request.tensors)
            answer = self.answer_dispute(
                await self.get_backend()._run(party.respond, question, priority=VERIFY)
            )
            if answer is None:  # a silent party (a fault): the referee's timeout makes it forfeit
                await asyncio.sleep(SILENT_FOR)
                raise RequestError(swarm_pb2.Error.TIMEOUT, "no answer")
            return encode_answer(refs, answer, request.tensors)
        except Exception as e:
            return error_reply(swarm_pb2.DisputeAnswerResponse, e, context, "dispute_answer", logger)


def encode_answer(refs: tuple[int, ...], answer: Answer, tensors: bool) -> swarm_pb2.DisputeAnswerResponse:
    """A party's Answer as a reply (remote.decode_answer reads it back)."""
    response = swarm_pb2.DisputeAnswerResponse(refs=refs)
    if tensors:
        response.tensors.extend(serialize(answer.tensors[ref]) for ref in refs)
    else:
        response.digests.extend(answer.digests[ref] for ref in refs)
        response.proofs.extend(b"".join(answer.proofs.get(ref, ())) for ref in refs)
    return response


def _tensor_nbytes(trace: SpanTrace, ref: int) -> int:
    if ref == SPAN_INPUT:
        tensor = trace.input
    else:
        block, op = divmod(ref, len(OPERATORS))
        tensor = trace.blocks[block][op][1]
    return tensor.numel() * tensor.element_size()
