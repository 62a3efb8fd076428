"""A node's commitment to a traced forward: traced one block per compute job, so a request that arrives
meanwhile runs after one block's trace rather than after the whole span's, and the commitment is the same
as a trace of the whole span at once."""

import asyncio
import json
import types

import torch

from swarm.models.span import LlamaSpan
from swarm.models.tiny import tiny_llama_config
from swarm.node.backend import SpanBackend, SpanInputs
from swarm.node.limits import NodeLimits
from swarm.proto import swarm_pb2
from swarm.utils.tensors import serialize
from swarm.verification.determinism import deterministic_profile
from swarm.verification.merkle import SpanCommitment, commit_trace
from swarm.verification.service import VerificationServicer
from swarm.verification.trace import trace_span

BLOCKS, HIDDEN = 4, 32


def caller(peer_id: str = "QmCaller"):
    """What rpc_commit reads of its P2PContext: who calls (traces are kept per caller)."""
    return types.SimpleNamespace(remote_id=types.SimpleNamespace(to_base58=lambda: peer_id))


def test_a_request_waits_for_one_blocks_trace_and_the_commitment_is_the_whole_spans():
    torch.manual_seed(0)
    span = LlamaSpan(tiny_llama_config(num_blocks=BLOCKS, hidden_size=HIDDEN), 0, BLOCKS).float().eval()
    hidden = torch.randn(1, 9, HIDDEN)
    step = SpanInputs(torch.randn(1, 2, HIDDEN), None, None, slice(0, BLOCKS), torch.float32)
    calls: list[tuple[int, int]] = []  # (block, tokens) of every layer call, in order
    served = []

    def record(block: int):
        def hook(module, args, kwargs):
            calls.append((block, args[0].shape[1]))
            if (block, args[0].shape[1]) == (0, 9) and not served:
                # a client's request arrives while the commit traces its first block
                served.append(backend.executor.submit(backend._forward_sync, step))

        return hook

    for block, layer in enumerate(span.layers):
        layer.register_forward_pre_hook(record(block), with_kwargs=True)
    request = swarm_pb2.CommitRequest(
        request_id="r1", start_block=0, end_block=BLOCKS, tensors=[serialize(hidden)]
    )
    with deterministic_profile():  # before the backend: its compute thread adopts the profile's threads
        backend = SpanBackend(span, NodeLimits(), "cpu", torch.float32)
        try:
            response = asyncio.run(VerificationServicer(lambda: backend).rpc_commit(request, caller()))
            served[0].result(10)
            expected = commit_trace(trace_span(span, hidden), span)
        finally:
            backend.shutdown()
    assert not response.HasField("error"), response.error
    committed = SpanCommitment.from_dict(json.loads(response.commitment))
    assert committed == expected
    traced = [block for block, tokens in calls if tokens == 9]
    assert traced[:BLOCKS] == list(range(BLOCKS))
    # the request ran right after the trace's first block, before the rest of the trace
    assert calls[1 : 1 + BLOCKS] == [(block, 2) for block in range(BLOCKS)]
