"""Generation across hosts in network namespaces: shaped links, and a link cut mid-generation."""

import pytest
import torch
from transformers import LlamaForCausalLM

from swarm.client import DistributedModelForCausalLM
from swarm.testing.netns import NetnsHarness, unavailable_reason

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(unavailable_reason() is not None, reason=f"netns harness: {unavailable_reason()}"),
]

PROMPT_LEN, NEW_TOKENS = 10, 32


@pytest.fixture(scope="module")
def expected(tiny_model):
    local = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    input_ids = torch.randint(3, 256, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return input_ids, local.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)


def run_swarm(tiny_model, tmp_path, shaping, spans):
    harness = NetnsHarness(workdir=tmp_path / "netns")
    try:
        harness.add_host("bootstrap", **shaping)
        peers = harness.start_bootstrap("bootstrap")
        processes = []
        for index, (blocks, throughput) in enumerate(spans):
            name = f"host{index}"
            harness.add_host(name, **shaping)
            processes.append(
                harness.start_node(name, str(tiny_model), blocks, peers, "--throughput", str(throughput))
            )
        for process in processes:
            harness.wait_ready(process)
        return harness, peers, processes
    except BaseException:
        harness.close()
        raise


def generate(tiny_model, peers, input_ids, on_step=None, on_hop=None, **config):
    with DistributedModelForCausalLM.from_pretrained(tiny_model, peers, **config) as model:
        with model.inference_session(max_length=PROMPT_LEN + NEW_TOKENS) as session:
            session.on_step, session.on_hop = on_step, on_hop
            out = model.generate(input_ids, max_new_tokens=NEW_TOKENS, session=session)
            return out, session.route, session.num_recoveries


def test_generation_across_hosts_with_100_mbit_links(tiny_model, tmp_path, expected):
    input_ids, reference = expected
    harness, peers, processes = run_swarm(
        tiny_model, tmp_path, {"rate_mbit": 100}, [("0:2", 10), ("2:4", 10), ("4:6", 10)]
    )
    with harness:
        out, route, _ = generate(tiny_model, peers, input_ids)
        assert torch.equal(out, reference)
        assert {span.peer_id for span in route} == {p.peer_id for p in processes}
        assert all("/ip4/10.231.0." in peer for peer in peers)


def test_generation_with_50ms_rtt_and_100_mbit(tiny_model, tmp_path, expected):
    input_ids, reference = expected
    shaping = {"delay_ms": 25, "rate_mbit": 100}  # 25 ms each way to every host: 50 ms RTT
    harness, peers, processes = run_swarm(
        tiny_model, tmp_path, shaping, [("0:2", 10), ("2:4", 10), ("4:6", 10)]
    )
    with harness:
        hops = []
        # the client drives the chain (no push), so each hop is one round trip from the client
        out, route, _ = generate(
            tiny_model,
            peers,
            input_ids,
            on_hop=lambda span, tokens, seconds: hops.append(seconds),
            push=False,
        )
        assert torch.equal(out, reference)
        assert {span.peer_id for span in route} == {p.peer_id for p in processes}
        # peers are reachable only through their relays, so every hop took at least one 50 ms round trip
        assert all("/ip4/10.231.0." in peer and "/tcp/41000/" in peer for peer in peers)
        assert len(hops) == 3 * NEW_TOKENS and min(hops) >= 0.050


def test_link_cut_mid_generation_fails_over_with_the_same_text(tiny_model, tmp_path, expected):
    input_ids, reference = expected
    harness, peers, processes = run_swarm(
        tiny_model, tmp_path, {"rate_mbit": 100}, [("0:3", 100), ("3:6", 100), ("0:6", 1)]
    )
    with harness:
        cut = []

        def on_step(position):
            if position >= PROMPT_LEN + NEW_TOKENS // 2 and not cut:
                harness.cut("host1")  # the host serving [3, 6) vanishes from the network
                cut.append(position)

        out, route, recoveries = generate(
            tiny_model, peers, input_ids, on_step=on_step, request_timeout=5.0, max_retries=5
        )
        assert cut and recoveries == 1
        assert torch.equal(out, reference)
        assert [(s.start, s.end, s.peer_id) for s in route] == [
            (0, 3, processes[0].peer_id),
            (3, 6, processes[2].peer_id),
        ]
