"""--batch-decode through a real node: concurrent clients' decode steps run in batches, and every client
gets local transformers' greedy tokens; a session closed while its step waits fails alone."""

import threading

import pytest
import torch

from swarm.client import DistributedModelForCausalLM
from swarm.local import LocalSwarm
from swarm.models.checkpoint import resolve_checkpoint
from swarm.models.span import load_span
from swarm.node.backend import SpanBackend, SpanInputs
from swarm.node.errors import RequestError
from swarm.node.limits import NodeLimits
from swarm.node.sessions import Session

CLIENTS = 6
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def batching_swarm(tiny_model, tmp_path_factory):
    """One node serving the whole tiny Llama with --batch-decode 4."""
    swarm = LocalSwarm(workdir=tmp_path_factory.mktemp("batch-decode"))
    try:
        swarm.start_bootstrap()
        swarm.start_node(str(tiny_model), "0:6", "--batch-decode", "4")
        yield swarm
    finally:
        swarm.close()


def prompt(seed: int) -> torch.Tensor:
    length = 4 + 3 * seed  # caches of different lengths in one batch
    return torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def test_concurrent_clients_get_local_greedy_tokens_through_batched_steps(
    batching_swarm, tiny_model, local_model
):
    outputs: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    with DistributedModelForCausalLM.from_pretrained(tiny_model, batching_swarm.initial_peers) as model:
        barrier = threading.Barrier(CLIENTS)

        def client(seed: int) -> None:
            try:
                barrier.wait(30)
                outputs[seed] = model.generate(prompt(seed), max_new_tokens=NEW_TOKENS, do_sample=False)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert not errors, errors
    for seed in range(CLIENTS):
        with torch.no_grad():
            expected = local_model.generate(prompt(seed), max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(outputs[seed], expected), seed
    node = next(p for p in batching_swarm.processes if p.span is not None)
    assert "ran as one call (--batch-decode)" in node.log_path.read_text()  # batches did form


@torch.inference_mode()
def test_a_closed_session_fails_only_its_own_step_in_a_batch(tiny_model, local_model):
    """The node's backend itself (no mocks): three sessions' steps in one batch, one closed meanwhile."""
    span = load_span(resolve_checkpoint(str(tiny_model)), 0, 6)
    backend = SpanBackend(span, NodeLimits(decode_batch=4), "cpu", torch.float32)
    try:
        sessions = []
        for index in range(3):
            session = Session(f"s{index}", 0, 6, slice(0, 6), max_length=32)
            backend.sessions.register(session)
            backend.reserve_cache(session, 1)
            hidden = local_model.model.embed_tokens(prompt(index))
            backend._inference_sync(session, 0, SpanInputs(hidden, None, None, slice(0, 6), torch.float32))
            sessions.append(session)
        backend.sessions.release(sessions[1])
        new = local_model.model.embed_tokens(torch.tensor([[5]]))
        steps = [(s, s.length, SpanInputs(new, None, None, slice(0, 6), torch.float32)) for s in sessions]
        outcomes = backend._inference_batch_sync(steps)
        assert [ok for ok, _ in outcomes] == [True, False, True]
        assert isinstance(outcomes[1][1], RequestError) and "closed" in str(outcomes[1][1])
        lengths = [prompt(i).shape[1] for i in range(3)]
        assert [s.length for s in sessions] == [lengths[0] + 1, lengths[1], lengths[2] + 1]  # 1: not stepped
        assert backend.batched_steps == 2
    finally:
        backend.shutdown()
