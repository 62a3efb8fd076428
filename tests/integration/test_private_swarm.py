"""A private swarm (--swarm-key): members generate as before; outsiders read no records, are refused on every
handler and can't get routed to; after a key rotation, a peer with only the old key is out once the grace
period ends."""

import contextlib
import json
import shutil
import time

import pytest
import torch

from swarm.access import SWARM_KEY_ENV, create_key_file, rotate_key_file
from swarm.access.membership import REFUSAL
from swarm.client import DistributedModelForCausalLM, RemoteError
from swarm.client.remote import get_info, remote_forward
from swarm.dht.factory import create_dht
from swarm.dht.swarm_map import list_models, model_map
from swarm.local import LocalSwarm, run_cli
from swarm.proto import swarm_pb2
from swarm.protocol import NodeProtocol
from swarm.utils.aio import BackgroundLoop

FORBIDDEN = swarm_pb2.Error.FORBIDDEN
UPDATE = ["--update-period", "3"]  # nodes re-announce soon after a rotation (grace periods here: seconds)


@pytest.fixture(scope="module")
def private(tiny_model, tmp_path_factory):
    """A bootstrap peer and two nodes, all with one swarm key."""
    workdir = tmp_path_factory.mktemp("private-swarm")
    key = workdir / "swarm.key"
    create_key_file(key)
    swarm = LocalSwarm(workdir=workdir / "swarm", env={SWARM_KEY_ENV: str(key)})
    try:
        swarm.start_bootstrap()
        nodes = [swarm.start_node(str(tiny_model), span, *UPDATE, wait=False) for span in ("0:3", "3:6")]
        for node in nodes:
            swarm.wait_ready(node)
        swarm.key, swarm.nodes = key, nodes
        yield swarm
    finally:
        swarm.close()


def served_models(peers, *extra: str, attempts: int = 1) -> dict[str, list[str]]:
    """model -> the peer ids of its ONLINE nodes, as `swarm health --json` shows them (asked again, up to
    `attempts` times, while it shows none: a peer that just joined may find nothing on its first read)."""
    for _ in range(attempts):
        result = run_cli(["health", "--initial-peers", *peers, "--json", *extra], timeout=120)
        maps = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        served = {
            m["model"]: [n["peer_id"] for n in m["nodes"] if n["state"] == "ONLINE"]
            for m in maps
            if "model" in m
        }
        if served:
            return served
    return {}


def generate(tiny_model, peers, key, input_ids) -> torch.Tensor:
    with DistributedModelForCausalLM.from_pretrained(
        tiny_model, peers, swarm_key=key, wait_for_blocks=20.0
    ) as model:
        return model.generate(input_ids, max_new_tokens=12, do_sample=False)


class Peer:
    """A bare DHT peer in this process, with or without a key, that calls nodes directly."""

    def __init__(self, peers, swarm_key=None):
        self.loop = BackgroundLoop()
        self.dht, _ = create_dht(peers, client_mode=True, swarm_key=swarm_key)
        self.p2p = self.loop.run(self.dht.replicate_p2p(), timeout=30)

    def run(self, coro):
        return self.loop.run(coro, timeout=60)

    def info(self, peer_id: str) -> swarm_pb2.InfoResponse:
        return self.run(get_info(self.p2p, peer_id, timeout=20))

    def forward(self, peer_id: str):
        return self.run(
            remote_forward(self.p2p, peer_id, 0, 1, torch.zeros(1, 2, 64), None, None, timeout=20)
        )

    def inference(self, peer_id: str) -> swarm_pb2.InferenceResponse:
        async def first_reply():
            async def requests():
                yield swarm_pb2.InferenceRequest()

            stream = await NodeProtocol.stub(self.p2p, peer_id).rpc_inference(requests())
            async with contextlib.aclosing(stream):
                async for reply in stream:
                    return reply

        return self.run(first_reply())

    def models(self) -> dict[str, list[str]]:
        """model -> the peer ids of its ONLINE nodes, as `swarm health --json` shows them."""
        maps = [model_map(self.dht, model) for model in list_models(self.dht)]
        return {m["model"]: [n["peer_id"] for n in m["nodes"] if n["state"] == "ONLINE"] for m in maps}

    def close(self):
        self.run(self.p2p.shutdown())
        self.dht.shutdown()
        self.loop.close()


def test_members_generate_as_in_a_public_swarm(private, tiny_model, local_model):
    input_ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    out = generate(tiny_model, private.initial_peers, private.key, input_ids)
    with torch.no_grad():
        expected = local_model.generate(input_ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, expected)
    assert served_models(private.initial_peers, "--swarm-key", str(private.key), attempts=3) == {
        "tiny-llama": [node.peer_id for node in private.nodes]
    }


def test_outsiders_read_nothing_are_refused_and_are_never_routed_to(private, tiny_model, tmp_path):
    wrong = tmp_path / "other.key"
    create_key_file(wrong)
    peers = private.initial_peers
    assert served_models(peers) == {}  # `swarm health` without the key

    node = private.nodes[0].peer_id
    member, outsiders = Peer(peers, private.key), [Peer(peers), Peer(peers, wrong)]
    outside = LocalSwarm(workdir=tmp_path / "outside")
    outside.initial_peers = list(peers)
    try:
        for outsider in outsiders:
            assert outsider.models() == {}
            info = outsider.info(node)
            assert info.error.code == FORBIDDEN and info.error.message == REFUSAL and not info.server.peer_id
            with pytest.raises(RemoteError) as refused:
                outsider.forward(node)
            assert refused.value.code == FORBIDDEN
            reply = outsider.inference(node)
            assert reply.error.code == FORBIDDEN and reply.error.message == REFUSAL

        # an outsider's node announces blocks 0:6 of the same model into the same DHT: members never see it
        intruder = outside.start_node(str(tiny_model), "0:6", *UPDATE)
        deadline = time.monotonic() + 30
        while outsiders[0].models() != {"tiny-llama": [intruder.peer_id]}:  # outsiders see its records
            assert time.monotonic() < deadline, "the outsider's node never announced itself"
            time.sleep(1)
        time.sleep(4)  # more than one update period: it has written its records more than once
        assert member.models() == {"tiny-llama": [n.peer_id for n in private.nodes]}
    finally:
        outside.close()
        for peer in (member, *outsiders):
            peer.close()


def test_after_a_rotation_the_old_key_is_out_once_the_grace_period_ends(
    private, tiny_model, local_model, tmp_path
):
    old = tmp_path / "old.key"
    shutil.copy(private.key, old)  # what an expelled member keeps
    node = private.nodes[1].peer_id
    expelled, member = Peer(private.initial_peers, old), Peer(private.initial_peers, private.key)
    try:
        grace = 15.0
        rotate_key_file(private.key, grace)  # in place: the running members re-read it
        deadline = time.time() + grace
        time.sleep(2)  # members re-read their key file at most a second after it changed
        during = expelled.info(node)
        # still accepted during the grace period (unless this machine was so slow that the period ended)
        assert not during.HasField("error") or time.time() >= deadline
        assert not member.info(node).HasField("error")
        time.sleep(max(0.0, deadline - time.time()) + 1)
        assert expelled.info(node).error.code == FORBIDDEN
        assert not member.info(node).HasField("error")
        assert expelled.models() == {}
    finally:
        expelled.close()
        member.close()
    input_ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = local_model.generate(input_ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(generate(tiny_model, private.initial_peers, private.key, input_ids), expected)
