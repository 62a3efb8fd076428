"""The client blames the right node (real node processes on one span of the tiny Llama).

- a node that replies with NaN is banned, not the next node, which would refuse the NaN it passed on;
- a node that answers OVERLOADED is skipped for a moment, without a ban;
- a request the client itself got wrong (too many rows, a session longer than the nodes allow) raises
  RequestRefused once a second node refused it too, and nobody is banned;
- a node that calls requests malformed that another node serves is banned, and the call is served.
"""

from __future__ import annotations

import pytest
import torch

from swarm.client import DistributedModelForCausalLM
from swarm.client.errors import RequestRefused
from tests.integration.verification_helpers import start_nodes

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def blame_swarm(tiny_model, tmp_path_factory):
    """Three nodes on all 6 blocks, routed in this order: one that replies NaN (announcing the most
    throughput), one whose KV cache holds 8 tokens (answers OVERLOADED), an honest one."""
    from swarm.local import LocalSwarm

    swarm = LocalSwarm(workdir=tmp_path_factory.mktemp("blame"))
    try:
        swarm.start_bootstrap()
        common = ("--max-batch-size", "4", "--update-period", "2")
        nodes = start_nodes(
            swarm,
            tiny_model,
            {
                "nan": ("0:6", *common, "--throughput", "1000", "--fault", "nan_output"),
                "busy": ("0:6", *common, "--throughput", "500", "--cache-tokens", "8"),
                "honest": ("0:6", *common, "--throughput", "1"),
            },
        )
        yield swarm, {name: process.peer_id for name, process in nodes.items()}
    finally:
        swarm.close()


@pytest.fixture
def client(tiny_model, blame_swarm):
    swarm, _ = blame_swarm
    with DistributedModelForCausalLM.from_pretrained(tiny_model, swarm.initial_peers) as model:
        yield model


def _prompt(batch=1, length=6):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(0))


def test_the_node_that_sent_nan_is_banned_and_a_busy_one_only_skipped(client, blame_swarm, local_model):
    _, peers = blame_swarm
    input_ids = _prompt()
    with client.inference_session(max_length=16) as session:
        out = client.generate(input_ids, max_new_tokens=6, do_sample=False, session=session)
        recoveries = session.num_recoveries
    with torch.no_grad():
        expected = local_model.generate(input_ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, expected)
    assert recoveries == 2  # from the NaN node to the busy one, from the busy one to the honest one
    assert client.bans.failures(peers["nan"]) == 1
    assert client.bans.failures(peers["busy"]) == 0  # skipped for a moment, not banned
    assert client.bans.failures(peers["honest"]) == 0


def test_a_request_too_large_for_every_node_is_refused_and_bans_nobody(client, blame_swarm):
    _, peers = blame_swarm
    with pytest.raises(RequestRefused, match="TOO_LARGE"):
        client(_prompt(batch=6))  # one call of 6 rows (they fit a message): more than --max-batch-size 4
    with pytest.raises(RequestRefused, match="max_length"):
        with client.inference_session(max_length=10**6) as session:
            client.generate(_prompt(), max_new_tokens=1, session=session)
    assert all(client.bans.failures(peer) == 0 for peer in peers.values())
    assert not client.bans.active()


@pytest.fixture(scope="module")
def refusing_swarm(tiny_model, tmp_path_factory):
    """Two nodes on all 6 blocks: one that calls every request malformed (announcing the most throughput,
    so routes try it first) and an honest one."""
    from swarm.local import LocalSwarm

    swarm = LocalSwarm(workdir=tmp_path_factory.mktemp("refusing"))
    try:
        swarm.start_bootstrap()
        common = ("--max-batch-size", "4", "--update-period", "2")
        nodes = start_nodes(
            swarm,
            tiny_model,
            {
                "refuser": ("0:6", *common, "--throughput", "1000", "--fault", "refuse_requests"),
                "honest": ("0:6", *common, "--throughput", "1"),
            },
        )
        yield swarm, {name: process.peer_id for name, process in nodes.items()}
    finally:
        swarm.close()


def test_a_node_that_refuses_what_another_serves_is_banned(tiny_model, refusing_swarm, local_model):
    """Generation, and a forward and backward, through a swarm whose preferred node calls every request
    malformed: the client asks the other node, which serves it, so the results are an honest-only client's
    and the refusing node is banned."""
    swarm, peers = refusing_swarm
    input_ids = _prompt()
    with torch.no_grad():
        expected = local_model.generate(input_ids, max_new_tokens=4, do_sample=False)
    with DistributedModelForCausalLM.from_pretrained(tiny_model, swarm.initial_peers) as model:
        with model.inference_session(max_length=16) as session:
            out = model.generate(input_ids, max_new_tokens=4, do_sample=False, session=session)
            assert session.route[0].peer_id == peers["honest"]
        assert torch.equal(out, expected)
        assert model.bans.failures(peers["refuser"]) == 1 and model.bans.failures(peers["honest"]) == 0

    results = {}
    for name, options in {"fresh": {}, "honest_only": {"blocked_servers": [peers["refuser"]]}}.items():
        with DistributedModelForCausalLM.from_pretrained(
            tiny_model, swarm.initial_peers, tuning_mode="ptune", pre_seq_len=2, **options
        ) as model:
            with torch.no_grad():
                model.prompt_embeddings.weight.copy_(torch.linspace(-1, 1, 2 * 64).view(2, 64))
            logits = model(_prompt(batch=2)).logits
            logits.square().mean().backward()
            results[name] = (logits.detach(), model.prompt_embeddings.weight.grad.clone())
            if name == "fresh":
                assert model.bans.failures(peers["refuser"]) == 1
                assert {span.peer_id for span in model.last_route} == {peers["honest"]}
    torch.testing.assert_close(results["fresh"], results["honest_only"], rtol=0, atol=0)


def test_a_refusal_with_no_other_node_to_ask_is_raised_and_bans_nobody(tiny_model, refusing_swarm):
    swarm, peers = refusing_swarm
    with DistributedModelForCausalLM.from_pretrained(
        tiny_model, swarm.initial_peers, blocked_servers=[peers["honest"]]
    ) as model:
        with pytest.raises(RequestRefused, match="BAD_REQUEST"):
            model(_prompt())
        assert model.bans.failures(peers["refuser"]) == 0 and not model.bans.active()
