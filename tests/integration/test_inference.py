"""Inference through the swarm: generate() equals local transformers; sessions are bounded and isolated."""

import asyncio
import time

import pytest
import torch
from hivemind.p2p import PeerID

from swarm.client import DistributedModelForCausalLM, RemoteError
from swarm.client.inference import SpanStream
from swarm.client.remote import get_info
from swarm.client.routing import RemoteSpan
from swarm.models.checkpoint import resolve_checkpoint
from swarm.models.span import load_span
from swarm.node.kv_cache import SpanCache
from swarm.proto import swarm_pb2
from swarm.protocol import NodeProtocol
from swarm.utils.tensors import serialize

HIDDEN = 64
E = swarm_pb2.Error


@pytest.fixture(scope="module")
def client(tiny_model, tiny_swarm):
    """A client that drives the chain itself (no push)."""
    peers = tiny_swarm.initial_peers
    with DistributedModelForCausalLM.from_pretrained(tiny_model, peers, push=False) as model:
        yield model


@pytest.fixture(scope="module")
def push_client(tiny_model, tiny_swarm):
    """A client whose steps go node to node (server-to-server push, the default)."""
    with DistributedModelForCausalLM.from_pretrained(tiny_model, tiny_swarm.initial_peers) as model:
        assert model.client_config.push
        yield model


# the exactness tests run in both modes: the client-driven chain and server-to-server push
both_modes = pytest.mark.parametrize("mode", ["client", "push"])


@pytest.fixture
def chain_client(request, mode):
    return request.getfixturevalue("push_client" if mode == "push" else "client")


def prompt(batch=1, length=10, seed=0):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def local_generate(local_model, input_ids, **kwargs):
    with torch.no_grad():
        return local_model.generate(input_ids, do_sample=False, **kwargs)


# ---- generate() ------------------------------------------------------------------------------------------


@both_modes
def test_greedy_generation_equals_local(chain_client, local_model):
    input_ids = prompt()
    out = chain_client.generate(input_ids, max_new_tokens=32, do_sample=False)
    expected = local_generate(local_model, input_ids, max_new_tokens=32)
    assert out.shape == (1, 42)
    assert torch.equal(out, expected)


@both_modes
def test_session_continued_in_chunks_equals_local(chain_client, mode, local_model):
    client = chain_client
    input_ids = prompt(seed=1)
    expected = local_generate(local_model, input_ids, max_new_tokens=24)
    with client.inference_session(max_length=64) as session:
        first = client.generate(input_ids, max_new_tokens=8, session=session)
        assert torch.equal(first, expected[:, :18])
        second = client.generate(None, max_new_tokens=8, session=session)
        assert torch.equal(second, expected[:, :26])
        third = client.generate(None, max_new_tokens=8, session=session)
        assert torch.equal(third, expected)
        assert session.position == 33  # the last token is pending: the nodes see it on the next call
        assert [(s.start, s.end) for s in session.route] == [(0, 2), (2, 5), (5, 6)]
        # the client sent every step to the first node; with push the others got only their first from it
        sent = [state.stream.num_sent for state in session._spans]
        assert sent == ([24, 1, 1] if mode == "push" else [24, 24, 24])
        assert session.num_push_errors == 0 and session.num_recoveries == 0


def test_session_appends_new_input_ids(client, local_model):
    """Text added between calls (a chat turn) goes after everything generated so far."""
    first_prompt, turn = prompt(length=6, seed=2), prompt(length=4, seed=3)
    with client.inference_session(max_length=64) as session:
        first = client.generate(first_prompt, max_new_tokens=5, session=session)
        out = client.generate(turn, max_new_tokens=6, session=session)
    expected = local_generate(local_model, torch.cat([first, turn], dim=1), max_new_tokens=6)
    assert torch.equal(out, expected)


@both_modes
def test_batch_with_left_padding_equals_local(chain_client, local_model):
    client = chain_client
    input_ids = prompt(batch=3, length=9, seed=4)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    attention_mask[2, :1] = 0
    input_ids[attention_mask == 0] = 0
    out = client.generate(input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False)
    expected = local_generate(local_model, input_ids, attention_mask=attention_mask, max_new_tokens=12)
    assert torch.equal(out, expected)


def test_long_prompt_is_prefilled_in_chunks(client, local_model):
    input_ids = prompt(length=70, seed=5)
    expected = local_generate(local_model, input_ids, max_new_tokens=6)
    client.client_config.max_step_tokens = 16  # 70 tokens -> 5 prefill steps
    try:
        out = client.generate(input_ids, max_new_tokens=6)
    finally:
        client.client_config.max_step_tokens = 1024
    assert torch.equal(out, expected)


def test_generation_stops_at_eos(client, local_model):
    input_ids = prompt(seed=6)
    free_run = local_generate(local_model, input_ids, max_new_tokens=12)
    eos = int(free_run[0, 10 + 4])  # make the 5th generated token the end of sequence
    first_eos = (free_run[0, 10:] == eos).nonzero()[0].item()
    out = client.generate(input_ids, max_new_tokens=12, eos_token_id=eos)
    expected = local_generate(local_model, input_ids, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(out, expected)
    assert out.shape[1] == 10 + first_eos + 1


def test_sampling_follows_temperature_top_k_top_p(client, local_model):
    input_ids = prompt(seed=7)
    greedy = client.generate(input_ids, max_new_tokens=8)
    # top_k=1 leaves one candidate: sampling must equal greedy
    assert torch.equal(client.generate(input_ids, max_new_tokens=8, do_sample=True, top_k=1), greedy)
    # a seeded generator makes sampling reproducible; different seeds explore different tokens
    runs = [
        client.generate(
            input_ids,
            max_new_tokens=8,
            do_sample=True,
            temperature=1.5,
            top_p=0.95,
            generator=torch.Generator().manual_seed(seed),
        )
        for seed in (0, 0, 1, 2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not all(torch.equal(runs[0], run) for run in runs[2:])
    # every sampled token lies in the top-k of the local model's distribution at that point
    sampled = client.generate(input_ids, max_new_tokens=8, do_sample=True, top_k=3, temperature=2.0)
    with torch.no_grad():
        logits = local_model(sampled).logits[0, 9:-1]
    top3 = logits.topk(3, dim=-1).indices
    assert all(int(token) in top3[i] for i, token in enumerate(sampled[0, 10:]))


def test_plain_forward_gives_logits(client, local_model):
    input_ids = prompt(seed=8)
    with torch.no_grad():
        torch.testing.assert_close(client(input_ids).logits, local_model(input_ids).logits, rtol=0, atol=1e-5)


def test_generate_rejects_bad_arguments(client):
    with pytest.raises(ValueError, match="needs input_ids"):
        client.generate(None, max_new_tokens=2)
    with client.inference_session(max_length=12) as session:
        with pytest.raises(ValueError, match="max_length"):
            client.generate(prompt(), max_new_tokens=5, session=session)
        # the refused call changed nothing: the session still works within its budget
        client.generate(prompt(length=4), max_new_tokens=2, session=session)
        with pytest.raises(ValueError, match="batch size"):
            client.generate(prompt(batch=2, length=2), max_new_tokens=1, session=session)


# ---- the node's side of sessions -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def session_node(tiny_model, tmp_path_factory):
    """One node with a 64-token cache budget and a 3 s idle timeout."""
    from swarm.local import LocalSwarm

    swarm = LocalSwarm(workdir=tmp_path_factory.mktemp("session-node"))
    swarm.start_bootstrap()
    process = swarm.start_node(
        str(tiny_model), "0:6", "--cache-tokens", "64", "--session-timeout", "3", "--update-period", "5"
    )
    with DistributedModelForCausalLM.from_pretrained(tiny_model, swarm.initial_peers) as model:
        model.find_route()
        yield model, process
    swarm.close()


def open_stream(model, process, max_length, start=0, end=6):
    span = RemoteSpan(process.peer_id, start, end, swarm_pb2.ServerInfo())
    return SpanStream(model.p2p, span, f"test-{time.monotonic_ns()}", max_length, timeout=30)


def step(model, stream, hidden, position):
    positions = torch.arange(position, position + hidden.shape[1]).expand(hidden.shape[0], -1)
    return model.run_async(stream.step(hidden, position, None, positions))


def tokens_left(model, process) -> int:
    return model.run_async(get_info(model.p2p, process.peer_id, 10)).server.cache_tokens_left


def wait_for_tokens_left(model, process, expected, timeout=10.0):
    deadline = time.monotonic() + timeout
    while tokens_left(model, process) != expected:
        assert time.monotonic() < deadline, f"cache_tokens_left stayed at {tokens_left(model, process)}"
        time.sleep(0.1)


def test_cache_budget_refuses_at_once_and_is_freed_on_close(session_node):
    model, process = session_node
    assert tokens_left(model, process) == 64
    first = open_stream(model, process, max_length=40)
    step(model, first, torch.randn(1, 3, HIDDEN), 0)
    assert tokens_left(model, process) == 24
    second = open_stream(model, process, max_length=20)
    started = time.monotonic()
    with pytest.raises(RemoteError) as info:
        step(model, second, torch.randn(2, 3, HIDDEN), 0)  # 2 x 20 = 40 > 24 left
    assert info.value.code == E.OVERLOADED and "KV cache is full" in str(info.value)
    assert time.monotonic() - started < 5
    model.run_async(second.close())
    model.run_async(first.close())
    wait_for_tokens_left(model, process, 64)


def test_cache_budget_counts_the_bytes_of_the_layers_a_session_uses(session_node, tiny_model):
    """The tiny Llama keeps 2 x 2 heads x 16 x 4 bytes = 256 bytes a token per layer, 1536 over its 6 blocks:
    the 64-token budget is 98304 bytes, and a session over 3 of the 6 blocks takes half a token's bytes."""
    model, process = session_node
    half = open_stream(model, process, max_length=40, start=0, end=3)
    hidden = torch.randn(1, 4, HIDDEN)
    first = step(model, half, hidden[:, :3], 0)
    assert tokens_left(model, process) == 44  # 40 x 768 bytes: what 20 whole-span tokens take
    whole = open_stream(model, process, max_length=50)
    with pytest.raises(RemoteError) as info:
        step(model, whole, torch.randn(1, 3, HIDDEN), 0)
    assert info.value.code == E.OVERLOADED
    assert "needs 76800 bytes" in str(info.value) and "67584 of 98304 bytes left" in str(info.value)
    # the refusal changed nothing for the session that fits: its next step continues its cache
    second = step(model, half, hidden[:, 3:], 3)
    span = load_span(resolve_checkpoint(tiny_model), 0, 3)
    with torch.no_grad():
        expected = span(hidden)
    torch.testing.assert_close(torch.cat([first, second], dim=1), expected, rtol=0, atol=1e-5)
    model.run_async(whole.close())
    model.run_async(half.close())
    wait_for_tokens_left(model, process, 64)


def test_cache_is_freed_when_the_client_disconnects(session_node):
    model, process = session_node
    stream = open_stream(model, process, max_length=30)
    step(model, stream, torch.randn(2, 3, HIDDEN), 0)
    assert tokens_left(model, process) == 4
    # drop the stream without a close message, as a crashed client would
    model.run_async(stream.abandon())
    wait_for_tokens_left(model, process, 64)


def test_idle_session_times_out(session_node):
    model, process = session_node
    stream = open_stream(model, process, max_length=10)
    step(model, stream, torch.randn(1, 2, HIDDEN), 0)
    assert tokens_left(model, process) == 54
    wait_for_tokens_left(model, process, 64, timeout=10)  # idle timeout is 3 s
    with pytest.raises(RemoteError) as info:
        step(model, stream, torch.randn(1, 1, HIDDEN), 2)
    assert info.value.code == E.TIMEOUT


def test_step_past_max_length_gets_a_clear_error(session_node):
    model, process = session_node
    stream = open_stream(model, process, max_length=8)
    step(model, stream, torch.randn(1, 6, HIDDEN), 0)
    with pytest.raises(RemoteError) as info:
        step(model, stream, torch.randn(1, 3, HIDDEN), 6)
    assert info.value.code == E.TOO_LARGE and "max_length 8" in str(info.value)
    step(model, stream, torch.randn(1, 2, HIDDEN), 6)  # the refused step changed nothing
    model.run_async(stream.close())


def test_sessions_are_isolated_from_a_client_sending_garbage(session_node, tiny_model):
    """Two concurrent sessions; one sends bad steps between good ones. The other's outputs stay exact."""
    model, process = session_node
    span = load_span(resolve_checkpoint(tiny_model), 0, 6)
    good, bad = open_stream(model, process, 16, 1, 4), open_stream(model, process, 16, 1, 4)
    hidden = torch.randn(1, 12, HIDDEN, generator=torch.Generator().manual_seed(0))
    bad_hidden = torch.randn(1, 12, HIDDEN, generator=torch.Generator().manual_seed(1))
    step(model, bad, bad_hidden[:, :2], 0)
    nan = torch.randn(1, 2, HIDDEN)
    nan[0, 0, 0] = float("nan")
    garbage = [
        (torch.randn(1, 2, HIDDEN // 2), 2, "hidden size"),  # wrong hidden size
        (nan, 2, "NaN"),
        (torch.randn(2, 2, HIDDEN), 2, "batch size"),  # batch differs from the session's
        (torch.randn(1, 2, HIDDEN), 5, "position"),  # skips ahead of the cache
        (torch.randn(1, 20, HIDDEN), 2, "max_length"),
        (torch.randn(1, 2, HIDDEN).half(), 2, None),  # a different wire dtype is fine: computed, cast back
    ]
    outputs = []
    cache = SpanCache(first_layer=1, num_layers=3, max_length=16)
    for i, (bad_input, position, message) in enumerate(garbage):
        outputs.append(step(model, good, hidden[:, 2 * i : 2 * i + 2], 2 * i))
        if message is None:
            step(model, bad, bad_input, position)
            step(model, bad, bad_hidden[:, 2:4], 2)  # rewinds over the half-precision step
            continue
        with pytest.raises(RemoteError, match=message):
            step(model, bad, bad_input, position)
    with torch.no_grad():
        expected = span(hidden, cache=cache, layers=slice(1, 4))
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, rtol=0, atol=1e-5)
    # the garbage session itself was never corrupted: its cache equals a clean run of its good steps
    after = step(model, bad, bad_hidden[:, 4:6], 4)
    with torch.no_grad():
        clean = span(bad_hidden[:, :6], layers=slice(1, 4))
    torch.testing.assert_close(after, clean[:, 4:6], rtol=0, atol=1e-5)
    model.run_async(good.close())
    model.run_async(bad.close())


def test_malformed_session_openings_are_refused(session_node):
    model, process = session_node
    stub = NodeProtocol.get_stub(model.p2p, PeerID.from_base58(process.peer_id))
    hidden = serialize(torch.randn(1, 1, HIDDEN))

    async def first_reply(request):
        async def requests():
            yield request
            await asyncio.sleep(5)

        responses = await stub.rpc_inference(requests())
        try:
            return await asyncio.wait_for(anext(responses), 10)
        finally:
            await responses.aclose()

    cases = [
        (swarm_pb2.InferenceRequest(session_id="", start_block=0, end_block=6, max_length=4), E.BAD_REQUEST),
        (
            swarm_pb2.InferenceRequest(session_id="a", start_block=0, end_block=9, max_length=4),
            E.UNKNOWN_BLOCKS,
        ),
        (swarm_pb2.InferenceRequest(session_id="a", start_block=0, end_block=6, max_length=0), E.BAD_REQUEST),
        (
            swarm_pb2.InferenceRequest(session_id="a", start_block=0, end_block=6, max_length=10**6),
            E.TOO_LARGE,
        ),
    ]
    for request, code in cases:
        request.tensors.append(hidden)
        reply = model.run_async(first_reply(request))
        assert reply.error.code == code, (request, reply)
    wait_for_tokens_left(model, process, 64)


def test_pushed_steps_continue_only_a_session_that_takes_them(session_node, tiny_model):
    """rpc_push as the previous node of a chain would call it: a good step runs in the session and its output
    reaches the client's stream under the step's id; every bad push is refused with a clear error and leaves
    the session as it was, and sessions opened without accept_push (or by another peer) take none."""
    model, process = session_node
    stub = NodeProtocol.get_stub(model.p2p, PeerID.from_base58(process.peer_id))
    owner = model.p2p.peer_id.to_base58()
    span = RemoteSpan(process.peer_id, 0, 6, swarm_pb2.ServerInfo())
    pushed = SpanStream(model.p2p, span, f"push-{time.monotonic_ns()}", 16, timeout=30, accept_push=True)
    plain = open_stream(model, process, max_length=16)
    hidden = torch.randn(1, 6, HIDDEN, generator=torch.Generator().manual_seed(2))
    first = step(model, pushed, hidden[:, :4], 0)
    step(model, plain, hidden[:, :4], 0)

    def push(session_id, tensor, position, step_id, push_owner=owner):
        request = swarm_pb2.InferenceRequest(
            session_id=session_id,
            position=position,
            tensors=[serialize(tensor)],
            position_ids=serialize(torch.arange(position, position + tensor.shape[1])[None]),
            step_id=step_id,
        )
        reply = model.run_async(stub.rpc_push(swarm_pb2.PushRequest(owner=push_owner, step=request)))
        return reply.error.code if reply.HasField("error") else None, reply.error.message

    refused = [
        (push("no-such-session", hidden[:, 4:5], 4, 7), E.UNKNOWN_SESSION, "takes pushed steps"),
        (push(plain.session_id, hidden[:, 4:5], 4, 7), E.UNKNOWN_SESSION, "takes pushed steps"),
        (push(pushed.session_id, hidden[:, 4:5], 4, 7, process.peer_id), E.UNKNOWN_SESSION, "takes pushed"),
        (push(pushed.session_id, torch.randn(1, 1, HIDDEN // 2), 4, 7), E.BAD_REQUEST, "hidden size"),
        (push(pushed.session_id, torch.randn(2, 1, HIDDEN), 4, 7), E.BAD_REQUEST, "batch size"),
        (push(pushed.session_id, hidden[:, 4:5], 2, 7), E.BAD_REQUEST, "does not continue"),  # a rewind
        (push(pushed.session_id, hidden[:, 4:5], 5, 7), E.BAD_REQUEST, "does not continue"),  # skips ahead
    ]
    for (code, message), expected_code, expected_text in refused:
        assert code == expected_code and expected_text in message, message
    assert push(pushed.session_id, hidden[:, 4:6], 4, 9) == (None, "")
    second = model.run_async(pushed.receive(9, 4, torch.Size([1, 2, HIDDEN])))
    with torch.no_grad():
        expected = load_span(resolve_checkpoint(tiny_model), 0, 6)(hidden)
    torch.testing.assert_close(torch.cat([first, second], dim=1), expected, rtol=0, atol=1e-5)
    assert pushed.num_sent == 1  # the client sent only the opening step
    model.run_async(pushed.close())
    model.run_async(plain.close())
    wait_for_tokens_left(model, process, 64)


def test_a_push_the_next_node_refuses_comes_back_to_the_client_as_a_notice(session_node, tiny_model):
    """The node serves the step, then tells the client on the same stream that the next session did not take
    it (here one opened without accept_push); that session is left as it was."""
    model, process = session_node
    span = RemoteSpan(process.peer_id, 0, 6, swarm_pb2.ServerInfo())
    pusher = SpanStream(model.p2p, span, f"pusher-{time.monotonic_ns()}", 16, timeout=30, accept_push=True)
    target = open_stream(model, process, max_length=16)
    hidden = torch.randn(1, 3, HIDDEN, generator=torch.Generator().manual_seed(3))
    step(model, pusher, hidden[:, :2], 0)
    before = step(model, target, hidden[:, :2], 0)
    push_to = [swarm_pb2.PushTarget(peer_id=process.peer_id, session_id=target.session_id)]
    positions = torch.tensor([[2]])
    model.run_async(
        pusher.send(pusher.request(hidden[:, 2:], 2, None, positions, step_id=5, push_to=push_to))
    )
    output = model.run_async(pusher.receive(5, 2, torch.Size([1, 1, HIDDEN])))
    notice = model.run_async(asyncio.wait_for(pusher.push_failure(5), 20))
    assert notice.code in (E.UNKNOWN_SESSION, E.INTERNAL) and notice.message
    with torch.no_grad():
        expected = load_span(resolve_checkpoint(tiny_model), 0, 6)(hidden)
    torch.testing.assert_close(output, expected[:, 2:], rtol=0, atol=1e-5)
    # the target still holds 2 tokens: its own next step continues it exactly
    after = step(model, target, hidden[:, 2:], 2)
    torch.testing.assert_close(torch.cat([before, after], dim=1), expected, rtol=0, atol=1e-5)
    model.run_async(pusher.close())
    model.run_async(target.close())
    wait_for_tokens_left(model, process, 64)


def test_a_resent_pushed_step_is_answered_again_not_run_twice(session_node, tiny_model):
    """The previous node's push got through but its answer was lost, so the client resends the step under the
    same id: the node answers from the step it ran, and a beam reorder applies once, not twice."""
    model, process = session_node
    stub = NodeProtocol.get_stub(model.p2p, PeerID.from_base58(process.peer_id))
    span = RemoteSpan(process.peer_id, 0, 6, swarm_pb2.ServerInfo())
    stream = SpanStream(model.p2p, span, f"resend-{time.monotonic_ns()}", 16, timeout=30, accept_push=True)
    hidden = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(4))
    step(model, stream, hidden[:, :3], 0)
    swap = torch.tensor([1, 0])
    at_3, at_4 = torch.tensor([[3], [3]]), torch.tensor([[4], [4]])
    request = stream.request(hidden[:, 3:4], 3, None, at_3, hypo_ids=swap, step_id=21)
    request.session_id = stream.session_id
    owner = model.p2p.peer_id.to_base58()
    pushed = model.run_async(stub.rpc_push(swarm_pb2.PushRequest(owner=owner, step=request)))
    assert not pushed.HasField("error"), pushed.error.message
    pushed_output = model.run_async(stream.receive(21, 3, torch.Size([2, 1, HIDDEN])))
    resent_output = model.run_async(stream.step(hidden[:, 3:4], 3, None, at_3, hypo_ids=swap, step_id=21))
    last = model.run_async(stream.step(hidden[:, 4:5], 4, None, at_4, step_id=22))
    with torch.no_grad():  # the cache's rows swapped once, before token 3
        reordered = torch.cat([hidden[[1, 0], :3], hidden[:, 3:]], dim=1)
        expected = load_span(resolve_checkpoint(tiny_model), 0, 6)(reordered)
    torch.testing.assert_close(resent_output, pushed_output, rtol=0, atol=0)
    torch.testing.assert_close(pushed_output, expected[:, 3:4], rtol=0, atol=1e-5)
    torch.testing.assert_close(last, expected[:, 4:5], rtol=0, atol=1e-5)
    model.run_async(stream.close())
    wait_for_tokens_left(model, process, 64)
