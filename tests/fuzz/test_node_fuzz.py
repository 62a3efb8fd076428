"""Hostile but well-formed requests against one live node, for every handler it serves (#15, fuzz suite).

Hypothesis builds protobuf requests with random dtypes, shapes (huge declared sizes included), truncated
and oversized buffers, NaN/inf, random block ranges, session ids, positions, max lengths and close flags,
sends them as unary calls or streams (interleaved with a good session), and bytes of one message type to a
handler of another. Every request must be answered within a bound; afterwards the node is still up, its
memory grew by a bounded amount, and a good forward and inference steps give the same bytes as before.

`SWARM_FUZZ_EXAMPLES` sets the examples per handler group (CI: 1,000 in all; `make fuzz`: 10,000, with
random seeds and the counts printed). CI runs the same derandomized examples every time.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os

import psutil
import pytest
import torch
from google.protobuf.message import DecodeError
from hivemind.p2p import P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm.client.remote import remote_forward
from swarm.proto import swarm_pb2
from swarm.protocol import NodeProtocol, VerificationProtocol
from swarm.utils.tensors import serialize

HIDDEN = 64  # the tiny model's
BLOCKS = (2, 4)  # what the node serves
EXAMPLES = int(os.environ.get("SWARM_FUZZ_EXAMPLES", "200"))  # per group: 5 groups, 1,000 in all
RANDOM = os.environ.get("SWARM_FUZZ_RANDOM", "") not in ("", "0")
ANSWER_WITHIN = 20.0  # seconds any request may take to be answered (the node's stream timeout is 2 s)
MEMORY_GROWTH = 600 * 2**20  # bytes of RSS the node may gain over the whole run

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
COUNTS: collections.Counter[str] = collections.Counter()  # outcomes, printed at the end

# ---- strategies -------------------------------------------------------------------------------------------

DTYPES = [
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int64",
    "int32",
    "uint8",
    "bool",
    "complex64",
    "",
    "x",
]
DIMENSIONS = st.one_of(
    st.integers(0, 8), st.integers(0, 2**32 - 1), st.sampled_from([HIDDEN, 2**31, 2**32 - 1])
)


@st.composite
def tensors(draw, good_hidden: bool = False) -> runtime_pb2.Tensor:
    """A serialized tensor: a real one (maybe with NaN/inf, cut or padded), or a made-up header."""
    if good_hidden or draw(st.booleans()):
        batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 6))
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
        values = torch.randn(
            batch, length, HIDDEN, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))
        )
        if draw(st.booleans()):
            values.view(-1)[draw(st.integers(0, values.numel() - 1))] = draw(
                st.sampled_from([math.nan, math.inf, -math.inf, 1e30])
            )
        proto = serialize(values.to(dtype))
        if good_hidden:
            return proto
        cut = draw(st.sampled_from(["whole", "truncated", "padded", "emptied"]))
        if cut == "truncated":
            proto.buffer = proto.buffer[: draw(st.integers(0, max(len(proto.buffer) - 1, 0)))]
        elif cut == "padded":
            proto.buffer += bytes(draw(st.integers(1, 64)))
        elif cut == "emptied":
            proto.buffer = b""
        return proto
    size = draw(st.lists(DIMENSIONS, min_size=0, max_size=5))
    return runtime_pb2.Tensor(
        buffer=draw(st.binary(max_size=4096)),
        size=size,
        dtype=draw(st.sampled_from(DTYPES)),
        compression=draw(st.integers(0, 7)),
        requires_grad=draw(st.booleans()),
        chunks=draw(st.integers(0, 3)),
    )


BLOCK = st.integers(0, 2**32 - 1) | st.integers(0, 8)
# mostly blocks the node serves (so that requests get past the first check), sometimes anything
BLOCKS_OF_REQUEST = st.sampled_from([(2, 3), (2, 4), (3, 4)]) | st.tuples(BLOCK, BLOCK)
MAYBE_TENSOR = st.none() | tensors()
# request tensors: anything, or a good hidden-states tensor (so the mask, positions and the rest get checked)
REQUEST_TENSORS = st.lists(tensors(), max_size=3) | st.lists(
    tensors(good_hidden=True), min_size=1, max_size=2
)


def _with_optional(request, mask, positions):
    if mask is not None:
        request.attention_mask.CopyFrom(mask)
    if positions is not None:
        request.position_ids.CopyFrom(positions)
    return request


@st.composite
def forward_requests(draw) -> swarm_pb2.ForwardRequest:
    start, end = draw(BLOCKS_OF_REQUEST)
    request = swarm_pb2.ForwardRequest(
        start_block=start, end_block=end, tensors=draw(st.lists(tensors(), max_size=3))
    )
    return _with_optional(request, draw(MAYBE_TENSOR), draw(MAYBE_TENSOR))


@st.composite
def backward_requests(draw) -> swarm_pb2.BackwardRequest:
    start, end = draw(BLOCKS_OF_REQUEST)
    request = swarm_pb2.BackwardRequest(
        start_block=start,
        end_block=end,
        tensors=draw(REQUEST_TENSORS | st.lists(tensors(), max_size=4)),
        receipt=draw(st.binary(max_size=64)),
    )
    return _with_optional(request, draw(MAYBE_TENSOR), draw(MAYBE_TENSOR))


@st.composite
def inference_requests(draw, first: bool) -> swarm_pb2.InferenceRequest:
    request = swarm_pb2.InferenceRequest(
        position=draw(st.integers(0, 40) | st.integers(0, 2**32 - 1)),
        close=draw(st.booleans()) if not first else draw(st.sampled_from([False, False, True])),
        tensors=draw(REQUEST_TENSORS),
    )
    if first or draw(st.booleans()):
        request.session_id = draw(st.text(max_size=200))
        request.max_length = draw(st.integers(0, 64) | st.integers(0, 2**32 - 1))
        request.start_block, request.end_block = draw(BLOCKS_OF_REQUEST)
    return _with_optional(request, draw(MAYBE_TENSOR), draw(MAYBE_TENSOR))


@st.composite
def commit_requests(draw) -> swarm_pb2.CommitRequest:
    start, end = draw(BLOCKS_OF_REQUEST)
    request = swarm_pb2.CommitRequest(
        request_id=draw(st.text(max_size=200)),
        start_block=start,
        end_block=end,
        tensors=draw(REQUEST_TENSORS),
    )
    return _with_optional(request, draw(MAYBE_TENSOR), draw(MAYBE_TENSOR))


@st.composite
def dispute_questions(draw) -> swarm_pb2.DisputeQuestionRequest:
    return swarm_pb2.DisputeQuestionRequest(
        request_id=draw(st.text(max_size=200)),
        round=draw(st.integers(0, 2**32 - 1)),
        refs=draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=40)),
        tensors=draw(st.booleans()),
    )


# ---- the node and the calls -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed(tiny_model, tmp_path_factory):
    """One node serving BLOCKS with small limits, a client, and what a good forward and session gave first."""
    from swarm.dht.factory import create_dht
    from swarm.local import LocalSwarm
    from swarm.utils.aio import BackgroundLoop

    swarm = LocalSwarm(workdir=tmp_path_factory.mktemp("fuzz-swarm"))
    loop = dht = p2p = None
    try:
        swarm.start_bootstrap()
        node = swarm.start_node(
            str(tiny_model),
            f"{BLOCKS[0]}:{BLOCKS[1]}",
            "--max-request-mb",
            "1",
            "--max-batch-size",
            "4",
            "--max-sequence-length",
            "64",
            "--stream-message-timeout",
            "2",
            "--session-timeout",
            "10",
            "--update-period",
            "5",
        )
        loop = BackgroundLoop()
        dht, _ = create_dht(swarm.initial_peers, client_mode=True)
        p2p = loop.run(dht.replicate_p2p())
        context = Fuzzed(swarm, node, loop, p2p)
        context.before = context.good_outputs()
        context.memory_before = context.node_memory()
        yield context
    finally:
        if p2p is not None:
            loop.run(p2p.shutdown())
        if dht is not None:
            dht.shutdown()
        if loop is not None:
            loop.close()
        swarm.close()
        if COUNTS:
            print("\nfuzz outcomes:", dict(sorted(COUNTS.items())))


class Fuzzed:
    def __init__(self, swarm, node, loop, p2p):
        self.swarm, self.node, self.loop, self.p2p = swarm, node, loop, p2p
        self.before: list[bytes] = []
        self.memory_before = 0

    def node_memory(self) -> int:
        return psutil.Process(self.node.pid).memory_info().rss

    def call(self, coroutine) -> None:
        """Run one call; it must end within the bound (with a reply or an error)."""
        self.loop.run(asyncio.wait_for(coroutine, ANSWER_WITHIN))
        assert self.node.alive(), "the node died"

    def good_outputs(self) -> list[bytes]:
        """Bytes of a good forward and of three good inference steps (same inputs every time)."""
        hidden = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(1))
        out = self.loop.run(
            remote_forward(
                self.p2p, self.node.peer_id, BLOCKS[0], BLOCKS[1], hidden, None, None, ANSWER_WITHIN
            )
        )
        results = [serialize(out).buffer]

        async def session():
            async def requests():
                for position, length in ((0, 3), (3, 1), (4, 1)):
                    request = swarm_pb2.InferenceRequest(
                        position=position, tensors=[serialize(hidden[:1, position : position + length])]
                    )
                    if position == 0:
                        request.session_id, request.max_length = "good", 16
                        request.start_block, request.end_block = BLOCKS
                    yield request
                    await asyncio.sleep(0)

            replies = await NodeProtocol.stub(self.p2p, self.node.peer_id).rpc_inference(requests())
            async for reply in replies:
                assert not reply.HasField("error"), reply.error
                results.append(reply.tensors[0].buffer)
                if len(results) == 4:
                    break
            await replies.aclose()

        self.loop.run(asyncio.wait_for(session(), ANSWER_WITHIN))
        return results


async def unary(p2p, protocol, peer_id: str, method: str, request) -> None:
    # a well-formed request gets a reply (maybe an Error one): a handler error would mean our code raised
    reply = await getattr(protocol.stub(p2p, peer_id), method)(request, timeout=ANSWER_WITHIN)
    COUNTS[f"{method}: {_outcome(reply)}"] += 1


async def streamed(p2p, peer_id: str, method: str, requests: list, replies_wanted: int) -> None:
    async def send():
        for request in requests:
            yield request
            await asyncio.sleep(0)

    replies = await getattr(NodeProtocol.stub(p2p, peer_id), method)(send())
    got = 0
    # read on after an error reply too: a stream it ends, the node closes once we have sent everything
    # (closing our side first could break our own pipe while we still write)
    async for reply in replies:
        COUNTS[f"{method}: {_outcome(reply)}"] += 1
        got += 1
        if got >= replies_wanted:
            break
    await replies.aclose()


def _outcome(reply) -> str:
    if reply.HasField("error"):
        return swarm_pb2.Error.Code.Name(reply.error.code)
    return "ok"


# ---- the properties ---------------------------------------------------------------------------------------


@FUZZ
@given(request=forward_requests() | backward_requests())
def test_unary_forward_and_backward(fuzzed, request):
    method = "rpc_forward" if isinstance(request, swarm_pb2.ForwardRequest) else "rpc_backward"
    fuzzed.call(unary(fuzzed.p2p, NodeProtocol, fuzzed.node.peer_id, method, request))


@FUZZ
@given(
    requests=st.lists(forward_requests(), min_size=1, max_size=4)
    | st.lists(backward_requests(), min_size=1, max_size=4)
)
def test_streamed_forward_and_backward(fuzzed, requests):
    method = (
        "rpc_forward_stream" if isinstance(requests[0], swarm_pb2.ForwardRequest) else "rpc_backward_stream"
    )
    fuzzed.call(streamed(fuzzed.p2p, fuzzed.node.peer_id, method, requests, 1))


@FUZZ
@given(
    first=inference_requests(first=True),
    rest=st.lists(inference_requests(first=False), max_size=4),
    good_first=st.booleans(),
    good_hidden=tensors(good_hidden=True),
)
def test_inference_sessions(fuzzed, first, rest, good_first, good_hidden):
    if good_first:  # a session that opens well, then gets hostile steps
        first = swarm_pb2.InferenceRequest(
            session_id="fuzz",
            max_length=16,
            start_block=BLOCKS[0],
            end_block=BLOCKS[1],
            tensors=[good_hidden],
        )
    requests = [first, *rest]
    closing = next((i for i, r in enumerate(requests) if r.close), None)
    if closing is None:
        fuzzed.call(streamed(fuzzed.p2p, fuzzed.node.peer_id, "rpc_inference", requests, len(requests)))
        return
    # `close` ends the session: the node stops reading there and ends the stream, which may reset it under
    # our own last write (the client SDK's close() expects that too)
    try:
        fuzzed.call(
            streamed(fuzzed.p2p, fuzzed.node.peer_id, "rpc_inference", requests[: closing + 1], closing)
        )
    except (BrokenPipeError, ConnectionResetError):
        COUNTS["rpc_inference: reset after close"] += 1


@FUZZ
@given(request=commit_requests() | dispute_questions())
def test_verification_handlers(fuzzed, request):
    method = "rpc_commit" if isinstance(request, swarm_pb2.CommitRequest) else "rpc_dispute_answer"
    fuzzed.call(unary(fuzzed.p2p, VerificationProtocol, fuzzed.node.peer_id, method, request))


@FUZZ
@given(
    method=st.sampled_from(["rpc_forward", "rpc_backward", "rpc_info"]),
    payload=st.binary(max_size=2048) | forward_requests().map(lambda r: r.SerializeToString()),
)
def test_raw_bytes_to_unary_handlers(fuzzed, method, payload):
    """Bytes that may not parse as the handler's message type (another type's, or noise)."""

    async def call():
        handle = NodeProtocol._get_handle_name(None, method)
        try:
            await fuzzed.p2p.call_protobuf_handler(
                PeerID.from_base58(fuzzed.node.peer_id), handle, _Raw(payload), swarm_pb2.ForwardResponse
            )
            COUNTS[f"raw {method}: answered"] += 1
        except (
            P2PHandlerError,
            DecodeError,
        ) as e:  # hivemind could not parse it, or we can't parse the reply
            COUNTS[f"raw {method}: {type(e).__name__}"] += 1

    fuzzed.call(call())


class _Raw:
    """Already-serialized bytes, sent as they are where hivemind expects a protobuf message."""

    def __init__(self, payload: bytes):
        self.payload = payload

    def SerializeToString(self) -> bytes:  # noqa: N802 (protobuf's name)
        return self.payload

    def ByteSize(self) -> int:  # noqa: N802
        return len(self.payload)


def test_the_node_survived_unchanged(fuzzed):
    """Run after the properties (file order): same bytes as before, bounded memory, still serving."""
    assert fuzzed.node.alive()
    assert fuzzed.good_outputs() == fuzzed.before
    grown = fuzzed.node_memory() - fuzzed.memory_before
    assert grown < MEMORY_GROWTH, f"the node's memory grew by {grown / 2**20:.0f} MiB"
    assert sum(COUNTS.values()) >= EXAMPLES, COUNTS
