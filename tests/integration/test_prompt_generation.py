"""generate() and inference sessions with trained prompts: the prompts enter the nodes' KV caches, and the
tokens equal transformers' greedy decoding with the same prompts prepended (ptune) or also added to each
block's input (deep_ptune). Saved prompts load into a new client and generate the same."""

import shutil
import time

import grpc
import pytest
import torch
from prompt_helpers import PRE_SEQ_LEN, deep_prompts_of, local_logits, make_client
from safetensors.torch import save_file
from transformers import AutoTokenizer

from swarm.client import DistributedModelForCausalLM
from swarm.client.errors import RemoteError
from swarm.client.inference import SpanStream
from swarm.client.remote import get_info
from swarm.client.routing import RemoteSpan
from swarm.local import LocalSwarm, run_cli
from swarm.models.tiny import write_tiny_tokenizer
from swarm.proto import gateway_pb2, gateway_pb2_grpc, swarm_pb2


def local_greedy(local_model, model, input_ids, new_tokens: int) -> torch.Tensor:
    """Greedy tokens from transformers' model with `model`'s prompts, recomputed from scratch each step."""
    prompts = model.prompt_embeddings.weight.detach()
    deep = deep_prompts_of(model).detach() if model.tuning_mode == "deep_ptune" else None
    ids = input_ids
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = local_logits(local_model, ids, prompts, deep)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def prompt_ids(seed: int, batch: int = 1, length: int = 6) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_greedy_generation_equals_local_with_the_prompts(mode, tiny_model, tiny_swarm, local_model):
    with make_client(tiny_model, tiny_swarm, mode, seed=1) as model:
        with torch.no_grad():  # prompts large enough to change what the model says
            model.prompt_embeddings.weight.normal_(std=1.0)
        input_ids = prompt_ids(0, batch=2)
        out = model.generate(input_ids, max_new_tokens=10)
        expected = local_greedy(local_model, model, input_ids, 10)
        assert torch.equal(out, expected)
        # the prompts made a difference: without them the model says something else
        plain = local_model.generate(input_ids, do_sample=False, max_new_tokens=10, pad_token_id=0)
        assert not torch.equal(out, plain)


def test_a_session_holds_the_prompts_once_and_continues(tiny_model, tiny_swarm, tiny_nodes, local_model):
    with make_client(tiny_model, tiny_swarm, "deep_ptune", seed=2) as model:

        def tokens_left() -> list[int]:
            return [
                model.run_async(get_info(model.p2p, node.peer_id, 10)).server.cache_tokens_left
                for node in tiny_nodes
            ]

        idle = tokens_left()
        first_ids = prompt_ids(1)
        with model.inference_session(max_length=30) as session:
            first = model.generate(first_ids, max_new_tokens=5, session=session)
            # the nodes hold the prompts' positions in front of the tokens fed so far, and reserved them
            assert session.position == PRE_SEQ_LEN + first.shape[1] - 1
            assert session.num_tokens == first.shape[1] - 1
            assert [free - busy for free, busy in zip(idle, tokens_left(), strict=True)] == [
                30 + PRE_SEQ_LEN
            ] * 3
            more = torch.tensor([[17, 42]])
            second = model.generate(more, max_new_tokens=6, session=session)
        assert torch.equal(second[:, : first.shape[1]], first)
        whole = torch.cat([first, more], dim=1)
        assert torch.equal(second, local_greedy(local_model, model, whole, 6))
        deadline = time.monotonic() + 10
        while tokens_left() != idle:  # freed on close
            assert time.monotonic() < deadline, f"{tokens_left()} != {idle}"
            time.sleep(0.1)


def test_saved_prompts_load_into_a_new_client_and_generate_the_same(tiny_model, tiny_swarm, tmp_path):
    path = tmp_path / "prompts.safetensors"
    input_ids = prompt_ids(3)
    with make_client(tiny_model, tiny_swarm, "deep_ptune", seed=4) as model:
        model.save_prompts(path)
        expected = model.generate(input_ids, max_new_tokens=8)
        weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with DistributedModelForCausalLM.from_pretrained(
        tiny_model, tiny_swarm.initial_peers, prompts=path
    ) as loaded:
        assert loaded.tuning_mode == "deep_ptune" and loaded.pre_seq_len == PRE_SEQ_LEN
        assert {name: p.detach() for name, p in loaded.named_parameters()}.keys() == weights.keys()
        for name, p in loaded.named_parameters():
            assert torch.equal(p.detach(), weights[name])
        assert torch.equal(loaded.generate(input_ids, max_new_tokens=8), expected)

    # what does not fit is refused before anything joins the swarm
    with pytest.raises(ValueError, match="holds deep_ptune prompts, not ptune"):
        DistributedModelForCausalLM.from_pretrained(tiny_model, [], prompts=path, tuning_mode="ptune")
    with pytest.raises(ValueError, match="holds 3 prompt positions, not 5"):
        DistributedModelForCausalLM.from_pretrained(tiny_model, [], prompts=path, pre_seq_len=5)
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ValueError, match="is not a prompts file"):
        DistributedModelForCausalLM.from_pretrained(tiny_model, [], prompts=other)
    wide = tmp_path / "wide.safetensors"
    save_file({"prompt_embeddings": torch.zeros(3, 65)}, str(wide), metadata={"swarm.tuning_mode": "ptune"})
    with pytest.raises(ValueError, match="prompts trained for another model"):
        DistributedModelForCausalLM.from_pretrained(tiny_model, [], prompts=wide)
    nan = tmp_path / "nan.safetensors"
    save_file(
        {"prompt_embeddings": torch.full((3, 64), float("nan"))},
        str(nan),
        metadata={"swarm.tuning_mode": "ptune"},
    )
    with pytest.raises(ValueError, match="NaN"):
        DistributedModelForCausalLM.from_pretrained(tiny_model, [], prompts=nan)


def test_deep_prompts_go_only_with_the_first_step(tiny_model, tiny_swarm, tiny_nodes):
    node = tiny_nodes[1]  # blocks [2, 5)
    with DistributedModelForCausalLM.from_pretrained(tiny_model, tiny_swarm.initial_peers) as model:
        span = RemoteSpan(node.peer_id, 2, 5, swarm_pb2.ServerInfo())
        hidden = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(0))
        positions = torch.arange(4).unsqueeze(0)

        def first_step(prompts):
            stream = SpanStream(model.p2p, span, f"deep-prompts-{time.monotonic_ns()}", 16, timeout=30)
            try:
                return stream, model.run_async(stream.step(hidden, 0, None, positions, prompts))
            except BaseException:
                model.run_async(stream.close())
                raise

        streams = []
        try:
            plain_stream, plain = first_step(None)
            streams.append(plain_stream)
            stream, zero = first_step(torch.zeros(3, 1, 2, 64))
            streams.append(stream)
            stream, prompted = first_step(torch.randn(3, 1, 2, 64))
            streams.append(stream)
            torch.testing.assert_close(zero, plain, rtol=0, atol=1e-6)  # zero prompts change nothing
            assert not torch.allclose(prompted[:, :2], plain[:, :2], atol=1e-3)  # the prompted positions...
            assert not torch.allclose(prompted[:, 2:], plain[:, 2:], atol=1e-3)  # ...and what attends to them
            with pytest.raises(RemoteError, match="deep prompts go with the step at position 0"):
                later = torch.arange(4, 5).unsqueeze(0)
                model.run_async(stream.step(torch.randn(1, 1, 64), 4, None, later, torch.randn(3, 1, 1, 64)))
            with pytest.raises(RemoteError, match="prompts have shape"):  # a prefix longer than the step
                first_step(torch.randn(3, 1, 5, 64))
        finally:
            for stream in streams:
                model.run_async(stream.close())


def test_a_node_killed_mid_generation_is_replayed_with_the_deep_prompts(tiny_model, local_model, tmp_path):
    with LocalSwarm(workdir=tmp_path) as swarm:
        swarm.start_bootstrap()
        nodes = swarm.start_nodes(str(tiny_model), ["0:3", "3:6", "3:6"])
        with make_client(tiny_model, swarm, "deep_ptune", seed=5) as model:
            input_ids = prompt_ids(6)
            with model.inference_session(max_length=20) as session:
                killed = []

                def kill_the_second_span(position):
                    if position >= PRE_SEQ_LEN + 7 and not killed:
                        victim = next(p for p in nodes if p.peer_id == session.route[-1].peer_id)
                        victim.kill()
                        killed.append(victim)

                session.on_step = kill_the_second_span
                out = model.generate(input_ids, max_new_tokens=10, session=session)
                assert killed and session.num_recoveries >= 1
                assert killed[0].peer_id not in {span.peer_id for span in session.route}
                assert torch.equal(out, local_greedy(local_model, model, input_ids, 10))
                # the replacement's cache holds the prompted positions: the next logits equal local ones
                hidden = session.step(model.head.embed(out[:, -1:]))
                logits = model.head.logits(hidden)[:, -1]
            prompts = model.prompt_embeddings.weight.detach()
            with torch.no_grad():
                expected = local_logits(local_model, out, prompts, deep_prompts_of(model).detach())[:, -1]
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


def test_the_gateway_generates_with_saved_prompts(tiny_model, tiny_swarm, local_model, tmp_path):
    path = tmp_path / "prompts.safetensors"
    input_ids = prompt_ids(7)
    with make_client(tiny_model, tiny_swarm, "deep_ptune", seed=6) as model:
        with torch.no_grad():
            model.prompt_embeddings.weight.normal_(std=1.0)
        model.save_prompts(path)
        expected = model.generate(input_ids, max_new_tokens=8)[0, input_ids.shape[1] :].tolist()
    plain = local_model.generate(input_ids, do_sample=False, max_new_tokens=8, pad_token_id=0)
    assert expected != plain[0, input_ids.shape[1] :].tolist()  # so the gateway must have used them
    gateway = tiny_swarm.start_gateway(str(tiny_model), "--prompts", str(path))
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            request = gateway_pb2.GenerateRequest(input_ids=input_ids[0].tolist(), max_new_tokens=8)
            messages = list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=120))
        assert [t for m in messages for t in m.token_ids] == expected
    finally:
        gateway.terminate()


def test_swarm_generate_takes_saved_prompts(tiny_model, tiny_swarm, local_model, tmp_path):
    folder = tmp_path / tiny_model.name  # the tiny Llama with a tokenizer, which `swarm generate` needs
    shutil.copytree(tiny_model, folder)
    write_tiny_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    path = tmp_path / "prompts.safetensors"
    prompt = "the swarm says"
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with make_client(folder, tiny_swarm, "ptune", seed=8) as model:
        with torch.no_grad():
            model.prompt_embeddings.weight.normal_(std=1.0)
        model.save_prompts(path)
        expected = model.generate(input_ids, max_new_tokens=6)[0, input_ids.shape[1] :]
    plain = local_model.generate(input_ids, do_sample=False, max_new_tokens=6, pad_token_id=0)
    assert expected.tolist() != plain[0, input_ids.shape[1] :].tolist()  # the prompts change the answer
    result = run_cli(
        ["generate", "--model", str(folder), "--prompt", prompt]
        + ["--max-new-tokens", "6", "--prompts", str(path), "--initial-peers", *tiny_swarm.initial_peers],
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == tokenizer.decode(expected, skip_special_tokens=True).strip()
