"""One real node process: every kind of bad request gets an error reply, and the node keeps serving."""

import os
import signal

import psutil
import pytest
import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from swarm.client import DistributedModelForCausalLM
from swarm.client.errors import RemoteError
from swarm.client.remote import get_info, remote_forward
from swarm.dht.factory import create_dht
from swarm.dht.swarm_view import read_swarm
from swarm.models.checkpoint import resolve_checkpoint
from swarm.models.span import load_span
from swarm.proto import swarm_pb2
from swarm.protocol import MAX_UNARY_MESSAGE_BYTES, NodeProtocol
from swarm.utils.aio import BackgroundLoop
from swarm.utils.tensors import serialize

HIDDEN = 64
TIMEOUT = 30


@pytest.fixture(scope="module")
def node(tiny_model, tmp_path_factory):
    """A node serving blocks [2, 4) with a 1 MiB request limit and a batch limit of 4."""
    from swarm.local import LocalSwarm

    swarm = LocalSwarm(workdir=tmp_path_factory.mktemp("node-swarm"))
    swarm.start_bootstrap()
    process = swarm.start_node(
        str(tiny_model), "2:4", "--max-request-mb", "1", "--max-batch-size", "4", "--update-period", "2"
    )
    yield swarm, process
    swarm.close()


@pytest.fixture(scope="module")
def client(node):
    swarm, _ = node
    loop = BackgroundLoop()
    dht, _ = create_dht(swarm.initial_peers, client_mode=True)
    p2p = loop.run(dht.replicate_p2p())
    yield loop, dht, p2p
    loop.run(p2p.shutdown())
    dht.shutdown()
    loop.close()


def forward(client, peer_id, hidden, start=2, end=4, **kwargs):
    loop, _, p2p = client
    return loop.run(
        remote_forward(p2p, peer_id, start, end, hidden, kwargs.get("mask"), kwargs.get("positions"), TIMEOUT)
    )


def expect_error(client, peer_id, code, request: swarm_pb2.ForwardRequest):
    loop, _, p2p = client
    stub = NodeProtocol.get_stub(p2p, PeerID.from_base58(peer_id))
    response = loop.run(stub.rpc_forward(request, timeout=TIMEOUT))
    assert response.HasField("error"), response
    assert response.error.code == code, response.error
    return response.error.message


def good_hidden(batch=2, seq=5):
    return torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(0))


def test_info_describes_the_node(node, client):
    _, process = node
    loop, _, p2p = client
    info = loop.run(get_info(p2p, process.peer_id, TIMEOUT))
    assert (info.server.start_block, info.server.end_block) == (2, 4)
    assert info.server.state == swarm_pb2.ServerInfo.ONLINE
    assert info.limits.max_batch_size == 4 and info.limits.max_request_bytes == 2**20
    assert info.model.num_blocks == 6 and len(info.model.block_hashes) == 6
    assert "event loop: asyncio" in process.log()  # unless SWARM_EVENT_LOOP=uvloop (test_gateway.py)


def test_bad_requests_get_errors_and_node_keeps_serving(node, client, tiny_model):
    _, process = node
    peer = process.peer_id
    E = swarm_pb2.Error

    def request(tensor_proto, start=2, end=4, **fields):
        return swarm_pb2.ForwardRequest(start_block=start, end_block=end, tensors=[tensor_proto], **fields)

    # wrong hidden size
    message = expect_error(client, peer, E.BAD_REQUEST, request(serialize(torch.zeros(1, 3, HIDDEN // 2))))
    assert "hidden size" in message
    # wrong dtypes: integer and double hidden states
    expect_error(
        client, peer, E.BAD_REQUEST, request(serialize(torch.zeros(1, 3, HIDDEN, dtype=torch.int64)))
    )
    expect_error(
        client, peer, E.BAD_REQUEST, request(serialize(torch.zeros(1, 3, HIDDEN, dtype=torch.float64)))
    )
    # wrong rank
    expect_error(client, peer, E.BAD_REQUEST, request(serialize(torch.zeros(3, HIDDEN))))
    # NaN and inf
    poisoned = good_hidden()
    poisoned[0, 1, 2] = float("nan")
    assert "NaN" in expect_error(client, peer, E.BAD_REQUEST, request(serialize(poisoned)))
    poisoned[0, 1, 2] = float("inf")
    expect_error(client, peer, E.BAD_REQUEST, request(serialize(poisoned)))
    # oversized: over the batch limit, and over the byte limit (streamed, since it exceeds a unary message)
    expect_error(client, peer, E.TOO_LARGE, request(serialize(torch.zeros(5, 1, HIDDEN))))
    for seq_len in (1100, 5000):  # 1.1 MB (unary) and 5.1 MB (streamed): both over the 1 MiB limit
        with pytest.raises(RemoteError) as info:
            forward(client, peer, torch.zeros(4, seq_len, HIDDEN))
        assert info.value.code == E.TOO_LARGE
    # a tensor whose buffer is truncated (declared shape needs more bytes)
    truncated = serialize(good_hidden())
    truncated.buffer = truncated.buffer[:-7]
    expect_error(client, peer, E.BAD_REQUEST, request(truncated))
    # a tensor claiming a huge shape with a tiny buffer: refused before any allocation
    huge = runtime_pb2.Tensor(buffer=b"\0" * 16, size=[4, 10**9, HIDDEN], dtype="float32")
    expect_error(client, peer, E.TOO_LARGE, request(huge))
    # unknown block ranges: outside the span, reversed, empty
    for start, end in [(0, 2), (3, 5), (3, 2), (2, 2)]:
        expect_error(client, peer, E.UNKNOWN_BLOCKS, request(serialize(good_hidden()), start=start, end=end))
    # mask of the wrong shape, negative positions
    expect_error(
        client,
        peer,
        E.BAD_REQUEST,
        request(serialize(good_hidden()), attention_mask=serialize(torch.ones(2, 4, dtype=torch.int64))),
    )
    expect_error(
        client,
        peer,
        E.BAD_REQUEST,
        request(serialize(good_hidden()), position_ids=serialize(-torch.ones(2, 5, dtype=torch.int64))),
    )
    # no tensors at all
    expect_error(client, peer, E.BAD_REQUEST, swarm_pb2.ForwardRequest(start_block=2, end_block=4))

    # a truncated protobuf message: hivemind can't parse it, the call fails, the node survives
    loop, _, p2p = client

    class Truncated:
        def SerializeToString(self):
            return request(serialize(good_hidden())).SerializeToString()[:-100]

    handle = NodeProtocol._get_handle_name(None, "rpc_forward")
    with pytest.raises(P2PHandlerError):
        loop.run(
            p2p.call_protobuf_handler(
                PeerID.from_base58(peer), handle, Truncated(), swarm_pb2.ForwardResponse
            ),
            timeout=TIMEOUT,
        )

    # after all that, a good request still succeeds and is right
    assert process.alive()
    hidden = good_hidden()
    out = forward(client, peer, hidden)
    span = load_span(resolve_checkpoint(tiny_model), 2, 4)
    with torch.no_grad():
        torch.testing.assert_close(out, span(hidden), rtol=0, atol=1e-5)
    # and a sub-range of the span works too
    out = forward(client, peer, hidden, start=3, end=4)
    with torch.no_grad():
        torch.testing.assert_close(out, span(hidden, layers=slice(1, 2)), rtol=0, atol=1e-5)


def test_large_requests_stream(tiny_swarm, tiny_model):
    """4 x 5000 x 64 fp32 = 5.1 MB exceeds a unary message, so it goes through rpc_forward_stream."""
    node_2_5 = next(p for p in tiny_swarm.processes if p.span == (2, 5) and p.alive())
    hidden = torch.randn(4, 5000, HIDDEN) * 0.1
    assert hidden.numel() * 4 > MAX_UNARY_MESSAGE_BYTES
    with DistributedModelForCausalLM.from_pretrained(tiny_model, tiny_swarm.initial_peers) as model:
        model.find_route()  # the DHT search meets the nodes, so the P2P daemon knows their addresses
        out = model.run_async(remote_forward(model.p2p, node_2_5.peer_id, 2, 5, hidden, None, None, TIMEOUT))
    span = load_span(resolve_checkpoint(tiny_model), 2, 5)
    with torch.no_grad():
        torch.testing.assert_close(out, span(hidden), rtol=0, atol=1e-4)


def test_sigterm_announces_offline_and_leaves_no_children(tiny_model, local_swarm):
    local_swarm.start_bootstrap()
    process = local_swarm.start_node(str(tiny_model), "0:2", "--update-period", "60")
    children = psutil.Process(process.pid).children(recursive=True)
    assert children, "a node runs a DHT process and a libp2p daemon"
    os.kill(process.pid, signal.SIGTERM)
    assert process.popen.wait(30) == 0
    assert "shutting down" in process.log()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left behind: {alive}"
    # the node's last word in the DHT (kept for 2 x update period): OFFLINE replaced ONLINE
    reader, _ = create_dht(local_swarm.initial_peers, client_mode=True)
    try:
        servers, _ = read_swarm(reader, "tiny-llama", 6)
        assert servers[process.peer_id].state == swarm_pb2.ServerInfo.OFFLINE
    finally:
        reader.shutdown()


def test_bad_backward_requests_get_errors_and_backward_is_exact(node, client, tiny_model):
    """rpc_backward checks its inputs like forward, and returns exact input (and deep prompt) gradients."""
    _, process = node
    loop, _, p2p = client
    stub = NodeProtocol.get_stub(p2p, PeerID.from_base58(process.peer_id))
    E = swarm_pb2.Error
    hidden, grad = good_hidden(), torch.randn(2, 5, HIDDEN)
    prompts = torch.randn(2, 1, 2, HIDDEN) * 0.1

    def backward(*tensors, start=2, end=4):
        request = swarm_pb2.BackwardRequest(
            start_block=start, end_block=end, tensors=[serialize(t) for t in tensors]
        )
        return loop.run(stub.rpc_backward(request, timeout=TIMEOUT))

    nan_grad = grad.clone()
    nan_grad[0, 0, 0] = float("nan")
    cases = [
        ((hidden,), E.BAD_REQUEST, "grad_outputs"),  # no gradient sent
        ((hidden, grad[:, :3]), E.BAD_REQUEST, "grad_outputs has shape"),
        ((hidden, nan_grad), E.BAD_REQUEST, "NaN"),
        (
            (hidden, grad, torch.randn(3, 1, 2, HIDDEN)),
            E.BAD_REQUEST,
            "prompts have shape",
        ),  # 3 layers, not 2
        (
            (hidden, grad, torch.randn(2, 1, 9, HIDDEN)),
            E.BAD_REQUEST,
            "prompts have shape",
        ),  # longer than input
    ]
    for tensors, code, message in cases:
        reply = backward(*tensors)
        assert reply.error.code == code and message in reply.error.message, reply.error
    reply = backward(hidden, grad, start=0, end=2)
    assert reply.error.code == E.UNKNOWN_BLOCKS

    reply = backward(hidden, grad, prompts)
    assert not reply.HasField("error"), reply.error
    span = load_span(resolve_checkpoint(tiny_model), 2, 4)
    reference_hidden = hidden.clone().requires_grad_(True)
    reference_prompts = prompts.clone().requires_grad_(True)
    span(reference_hidden, prompts=reference_prompts).backward(grad)
    grad_hidden, grad_prompts = (deserialize_torch_tensor(t) for t in reply.tensors)
    torch.testing.assert_close(grad_hidden, reference_hidden.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_prompts, reference_prompts.grad, rtol=0, atol=1e-5)
    assert all(not p.requires_grad for p in span.parameters())  # served weights are frozen


def test_a_node_runs_from_a_config_file(tiny_model, local_swarm, tmp_path):
    """`swarm node --config node.toml`: model, span and limits from the file; the command line still wins."""
    config = tmp_path / "node.toml"
    config.write_text(f'model = "{tiny_model}"\nblocks = "0:6"\nmax-batch-size = 3\ncache-tokens = 999\n')
    local_swarm.start_bootstrap()
    node = local_swarm.start_node(None, None, "--config", str(config), "--cache-tokens", "777")
    assert node.span == (0, 6)
    with DistributedModelForCausalLM.from_pretrained(tiny_model, local_swarm.initial_peers) as client:
        info = client.run_async(get_info(client.p2p, node.peer_id, 10))
    assert info.limits.max_batch_size == 3  # from the file
    assert info.server.cache_tokens_left == 777  # the flag over the file's 999
