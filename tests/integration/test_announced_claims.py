"""A node's announced throughput drives routing: one node announcing 1e300 tokens/s (real node processes on
the tiny Llama) is believed at most 10x the median announcement and 10x what the client measured of it, so
the honest nodes keep a share of the traffic."""

from __future__ import annotations

import collections

import pytest
import torch

from swarm.client import DistributedModelForCausalLM
from swarm.client.routing import MAX_OVER_MEASURED, MAX_OVER_MEDIAN
from tests.integration.verification_helpers import start_nodes

pytestmark = pytest.mark.timeout(300)

ROUTES = 600


def test_a_node_announcing_1e300_does_not_draw_all_traffic(tiny_model, local_swarm):
    local_swarm.start_bootstrap()
    nodes = start_nodes(
        local_swarm,
        tiny_model,
        # the honest nodes measure and announce their own throughput
        {"boaster": ("0:6", "--throughput", "1e300"), "honest": ("0:6",), "honest2": ("0:6",)},
    )
    peers = {name: process.peer_id for name, process in nodes.items()}
    with DistributedModelForCausalLM.from_pretrained(tiny_model, local_swarm.initial_peers) as model:
        believed = {info.peer_id: info.throughput for info in model.swarm.usable_servers(refresh=True)}
        assert set(believed) == set(peers.values())
        honest = [believed[peers["honest"]], believed[peers["honest2"]]]
        assert 0 < min(honest) and believed[peers["boaster"]] <= MAX_OVER_MEDIAN * max(honest) * (1 + 1e-9)

        input_ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(0))
        for _ in range(3):  # real calls: the client measures the nodes it was routed to
            model(input_ids)
        measured = model.swarm.measured_rates()
        assert measured, "no call was measured"
        for info in model.swarm.usable_servers():
            if info.peer_id in measured:  # a span of 6 blocks: block-tokens per second over 6
                assert info.throughput * 6 <= MAX_OVER_MEASURED * measured[info.peer_id] * (1 + 1e-9)

        counts = collections.Counter(
            model.swarm.find_route(0, 6, "forward")[0].peer_id for _ in range(ROUTES)
        )
    # believed as 10x an honest node at most, the boaster gets about 10/12 of the batches, not all of them
    assert counts[peers["honest"]] + counts[peers["honest2"]] >= 0.05 * ROUTES, counts
