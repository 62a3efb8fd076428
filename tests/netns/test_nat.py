"""A node behind a home router (a NAT'ed host: masqueraded, no inbound connections) serves through a relay."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from swarm.cli.main import main
from swarm.client import DistributedModelForCausalLM
from swarm.testing.netns import NetnsHarness, nat_unavailable_reason

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(
        nat_unavailable_reason() is not None, reason=f"netns harness: {nat_unavailable_reason()}"
    ),
]

PROMPT_LEN, NEW_TOKENS = 8, 16


@pytest.fixture(scope="module")
def expected(tiny_model):
    local = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    input_ids = torch.randint(3, 256, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return input_ids, local.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)


def generate(tiny_model, peers, input_ids, on_step=None, **config):
    with DistributedModelForCausalLM.from_pretrained(tiny_model, peers, **config) as model:
        with model.inference_session(max_length=PROMPT_LEN + NEW_TOKENS) as session:
            session.on_step = on_step
            out = model.generate(input_ids, max_new_tokens=NEW_TOKENS, session=session)
            return out, session.route, session.num_recoveries


def health(peers, capsys) -> dict[str, str]:
    """peer id -> how `swarm health --json` says clients reach it (run in-process: no second start-up)."""
    capsys.readouterr()
    assert main(["health", "--json", "--initial-peers", *peers]) == 0
    (swarm_map,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return {node["peer_id"]: node["reach"] for node in swarm_map["nodes"]}


def test_node_behind_nat_serves_through_the_bootstrap_relay(tiny_model, tmp_path, expected, capsys):
    input_ids, reference = expected
    with NetnsHarness(workdir=tmp_path / "netns") as harness:
        harness.add_host("relay")
        harness.add_nat_host("home")
        peers = harness.start_bootstrap("relay")
        node = harness.start_node("home", str(tiny_model), "0:6", peers, "--throughput", "10")
        harness.wait_ready(node)
        assert "unreachable" in node.wait_for(r"dialed us back at \S+: (\w+)", 5).group(0)
        out, route, recoveries = generate(tiny_model, peers, input_ids)
        assert torch.equal(out, reference)
        assert [s.peer_id for s in route] == [node.peer_id] and recoveries == 0
        assert route[0].info.using_relay and route[0].info.relay_maddrs[0].startswith(peers[0])
        assert health(peers, capsys) == {node.peer_id: "relayed"}


def test_without_relays_a_node_behind_nat_is_never_routed_to(tiny_model, tmp_path, expected, capsys):
    input_ids, reference = expected
    with NetnsHarness(workdir=tmp_path / "netns") as harness:
        harness.add_host("relay")
        harness.add_host("office")
        harness.add_nat_host("home")
        peers = harness.start_bootstrap("relay")
        # the NAT'ed node announces 100x the throughput: reachable, every route would go through it
        nat = harness.start_node(
            "home", str(tiny_model), "0:6", peers, "--throughput", "100", "--no-use-relay"
        )
        direct = harness.start_node("office", str(tiny_model), "0:6", peers, "--throughput", "1")
        harness.wait_ready(nat)
        harness.wait_ready(direct)
        out, route, recoveries = generate(tiny_model, peers, input_ids, request_timeout=10.0)
        assert torch.equal(out, reference)
        # no failed attempt on the NAT'ed node first: it was never tried
        assert [s.peer_id for s in route] == [direct.peer_id] and recoveries == 0
        assert health(peers, capsys) == {nat.peer_id: "unreachable", direct.peer_id: "direct"}


def test_relay_killed_mid_generation_the_session_recovers_with_the_same_text(
    tiny_model, tmp_path, expected, capsys
):
    input_ids, reference = expected
    with NetnsHarness(workdir=tmp_path / "netns") as harness:
        harness.add_host("relay")
        harness.add_host("bootstrap")
        harness.add_host("office")
        harness.add_nat_host("home")
        relay_peers = harness.start_bootstrap("relay")
        # the client and the direct node join through another bootstrap peer, which outlives the relay
        maddr_file = harness.workdir / "bootstrap2.maddrs"
        second = harness.spawn(
            "bootstrap",
            "bootstrap",
            [
                "dht",
                "--host",
                harness.hosts["bootstrap"].address,
                "--no-relay-service",
                "--initial-peers",
                *relay_peers,
                "--maddr-file",
                str(maddr_file),
            ],
        )
        second.wait_for(r"bootstrap peer \S+ is up", 60)
        peers = maddr_file.read_text().split()
        nat = harness.start_node(
            "home", str(tiny_model), "0:6", [*relay_peers, *peers], "--throughput", "100"
        )
        direct = harness.start_node("office", str(tiny_model), "0:6", peers, "--throughput", "1")
        harness.wait_ready(nat)
        harness.wait_ready(direct)
        relay_process = harness.hosts["relay"].processes[0]
        killed = []

        def on_step(position):
            if position >= PROMPT_LEN + NEW_TOKENS // 2 and not killed:
                relay_process.kill()
                killed.append(position)

        out, route, recoveries = generate(
            tiny_model, peers, input_ids, on_step=on_step, request_timeout=5.0, max_retries=5
        )
        assert killed and recoveries >= 1
        assert torch.equal(out, reference)
        assert [s.peer_id for s in route] == [direct.peer_id]
