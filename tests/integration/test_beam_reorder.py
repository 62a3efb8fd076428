"""Beam search's cache reordering: a step's hypo_ids make row i of every node's KV cache continue what row
hypo_ids[i] was; the logits equal transformers' on the reordered sequences, also after a node dies and its
replacement replays the reordered history."""

import time

import pytest
import torch

from swarm.client import DistributedModelForCausalLM
from swarm.client.errors import RemoteError
from swarm.client.inference import SpanStream
from swarm.client.routing import RemoteSpan
from swarm.local import LocalSwarm
from swarm.proto import swarm_pb2

ATOL = 1e-4  # cached steps against a full recomputation


def local_last_logits(local_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return local_model(ids).logits[:, -1]


def step_logits(model, session, ids: torch.Tensor, hypo_ids=None) -> torch.Tensor:
    hidden = session.step(model.head.embed(ids), hypo_ids=hypo_ids)
    return model.head.logits(hidden)[:, -1]


def test_hypo_ids_reorder_every_nodes_cache(tiny_model, tiny_swarm, local_model):
    prompts = torch.randint(3, 256, (3, 5), generator=torch.Generator().manual_seed(0))
    with DistributedModelForCausalLM.from_pretrained(tiny_model, tiny_swarm.initial_peers) as model:
        with model.inference_session(max_length=12) as session:
            torch.testing.assert_close(
                step_logits(model, session, prompts),
                local_last_logits(local_model, prompts),
                rtol=0,
                atol=ATOL,
            )
            sequences = prompts
            for hypo_ids, token in (([2, 0, 0], [[7], [8], [9]]), ([1, 2, 0], [[10], [11], [12]])):
                hypo_ids, token = torch.tensor(hypo_ids), torch.tensor(token)
                sequences = torch.cat([sequences[hypo_ids], token], dim=1)
                logits = step_logits(model, session, token, hypo_ids)
                torch.testing.assert_close(
                    logits, local_last_logits(local_model, sequences), rtol=0, atol=ATOL
                )
            # without the reordering the rows would continue their own past: the test can tell
            unordered = torch.cat(
                [prompts, torch.tensor([[7], [8], [9]]), torch.tensor([[10], [11], [12]])], 1
            )
            assert not torch.allclose(local_last_logits(local_model, unordered), logits, atol=1e-2)
            with pytest.raises(ValueError, match="hypo_ids must be 3 row indices"):
                session.step(model.head.embed(token), hypo_ids=torch.tensor([0, 3, 1]))
            assert session.position == 7  # the refused step changed nothing


def test_nodes_refuse_bad_hypo_ids(tiny_model, tiny_swarm, tiny_nodes):
    span = RemoteSpan(tiny_nodes[1].peer_id, 2, 5, swarm_pb2.ServerInfo())
    with DistributedModelForCausalLM.from_pretrained(tiny_model, tiny_swarm.initial_peers) as model:

        def step(stream, position, hypo_ids, batch=2, tokens=1):
            hidden = torch.randn(batch, tokens, 64)
            positions = torch.arange(position, position + tokens).expand(batch, -1)
            return model.run_async(stream.step(hidden, position, None, positions, None, hypo_ids))

        for position, hypo_ids, message in (
            (0, torch.tensor([1, 0]), "not with the first step"),
            (3, torch.tensor([0, 2]), r"must be 2 row indices in \[0, 2\)"),
            (3, torch.tensor([0, 1, 1]), "must be 2 row indices"),
            (3, torch.tensor([0.0, 1.0]), "hypo_ids: dtype"),
        ):
            stream = SpanStream(model.p2p, span, f"hypo-{time.monotonic_ns()}", 16, timeout=30)
            try:
                if position:
                    step(stream, 0, None, tokens=3)
                with pytest.raises(RemoteError, match=message):
                    step(stream, position, hypo_ids)
            finally:
                model.run_async(stream.close())


def test_a_node_killed_between_reorders_is_replayed_in_the_new_order(tiny_model, local_model, tmp_path):
    with LocalSwarm(workdir=tmp_path) as swarm:
        swarm.start_bootstrap()
        nodes = swarm.start_nodes(str(tiny_model), ["0:3", "3:6", "3:6"])
        prompts = torch.randint(3, 256, (3, 4), generator=torch.Generator().manual_seed(1))
        with DistributedModelForCausalLM.from_pretrained(
            tiny_model, swarm.initial_peers, max_retries=5
        ) as model:
            with model.inference_session(max_length=12) as session:
                step_logits(model, session, prompts)
                sequences = prompts
                for index, hypo_ids in enumerate(([1, 1, 0], [2, 0, 1], [0, 0, 2])):
                    if index == 2:  # the node serving [3, 6) dies after two reorders
                        victim = next(p for p in nodes if p.peer_id == session.route[-1].peer_id)
                        victim.kill()
                    hypo_ids, token = torch.tensor(hypo_ids), torch.tensor([[20 + index]] * 3)
                    sequences = torch.cat([sequences[hypo_ids], token], dim=1)
                    logits = step_logits(model, session, token, hypo_ids)
                assert session.num_recoveries >= 1 and victim.peer_id not in {
                    s.peer_id for s in session.route
                }
        torch.testing.assert_close(logits, local_last_logits(local_model, sequences), rtol=0, atol=ATOL)
