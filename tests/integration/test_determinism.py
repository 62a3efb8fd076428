"""Deterministic nodes (real processes) announce one profile and answer the same request with the same bytes,
which are also what this process computes under that profile; a node told to lie by one ulp does not."""

from __future__ import annotations

import pytest
import torch
from verification_helpers import p2p_client, padded_request, start_named_nodes

from swarm.client.remote import get_info, remote_forward
from swarm.local import LocalSwarm
from swarm.models.checkpoint import resolve_checkpoint
from swarm.models.span import load_span
from swarm.verification.determinism import (
    determinism_profile,
    deterministic_profile,
    is_deterministic,
    same_profile,
    server_profile,
)

HIDDEN = 64
TIMEOUT = 30
SPAN = (1, 4)
PERTURBED_BLOCK = 2
REPEATS = 3


@pytest.fixture(scope="module")
def nodes(tiny_model, tmp_path_factory):
    """Four nodes on blocks [1, 4): deterministic by default, by flag, by default with a one-ulp lie in
    block 2's down_proj, and with the profile off."""
    swarm = LocalSwarm(workdir=tmp_path_factory.mktemp("determinism-swarm"))
    try:
        swarm.start_bootstrap()
        told = ("--throughput", "1")  # don't measure: four nodes measuring at once on 2 cores is slow
        flags = {
            "default": (),
            "explicit": ("--deterministic",),
            "perturbed": ("--fault", f"perturb:block={PERTURBED_BLOCK}"),
            "loose": ("--no-deterministic", "--num-threads", "3"),
        }
        processes = start_named_nodes(swarm, tiny_model, SPAN, flags, *told)
        yield swarm, processes
    finally:
        swarm.close()


@pytest.fixture(scope="module")
def client(nodes):
    swarm, _ = nodes
    with p2p_client(swarm.initial_peers) as loop_and_p2p:
        yield loop_and_p2p


def forward(client, process) -> torch.Tensor:
    loop, p2p = client
    hidden, mask = padded_request(HIDDEN)
    return loop.run(remote_forward(p2p, process.peer_id, *SPAN, hidden, mask, None, TIMEOUT))


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().numpy().tobytes()


@pytest.fixture(scope="module")
def local(tiny_model):
    """(profile, output) of blocks [1, 4) computed here, with transformers' layers, under the profile."""
    span = load_span(resolve_checkpoint(str(tiny_model)), *SPAN)
    hidden, mask = padded_request(HIDDEN)
    with deterministic_profile(), torch.inference_mode():
        profile = determinism_profile(torch.float32, "cpu")
        output = span(hidden, attention_mask=mask)
    return profile, output


def profiles(client, processes) -> dict[str, dict[str, str]]:
    loop, p2p = client
    return {
        name: server_profile(loop.run(get_info(p2p, process.peer_id, TIMEOUT)).server)
        for name, process in processes.items()
    }


def test_deterministic_nodes_announce_the_same_profile(nodes, client, local):
    _, processes = nodes
    announced = profiles(client, processes)
    default, explicit = announced["default"], announced["explicit"]
    assert is_deterministic(default) and same_profile(default, explicit)  # on by default for fp32 on CPU
    assert default["threads"] == "1" and default["attention"] == "sdpa" and default["dtype"] == "float32"
    assert same_profile(default, local[0])  # a referee on this machine, under the profile, can compare
    assert same_profile(announced["perturbed"], default)  # a liar looks the same: only its outputs differ
    loose = announced["loose"]
    assert not is_deterministic(loose) and not same_profile(loose, default)
    for key in ("dtype", "device", "attention", "torch", "transformers"):  # the settings are what differ
        assert loose[key] == default[key], key
    assert loose["deterministic"] == "False"
    assert loose["threads"] == "3"  # --num-threads sets the compute's threads, announced in the profile


def test_deterministic_nodes_return_identical_bytes(nodes, client, local):
    _, processes = nodes
    expected = raw(local[1])
    for _ in range(REPEATS):
        for name in ("default", "explicit"):
            output = forward(client, processes[name])
            assert output.shape == (2, 7, HIDDEN) and torch.isfinite(output).all()
            assert raw(output) == expected, name  # bit for bit, and as transformers computes it here


def test_perturbed_node_differs_by_a_small_lie(nodes, client, local):
    _, processes = nodes
    honest = forward(client, processes["default"])
    lies = [forward(client, processes["perturbed"]) for _ in range(REPEATS)]
    assert all(raw(lie) == raw(lies[0]) for lie in lies)  # the lie is deterministic too
    lie = lies[0]
    assert raw(lie) != raw(honest) and raw(lie) != raw(local[1])
    assert not torch.equal(lie[0], honest[0]) and not torch.equal(lie[1], honest[1])  # every row moves
    torch.testing.assert_close(lie, honest, rtol=0, atol=1e-4)  # ...by a little: only bytes tell


def test_node_without_the_profile_matches_within_tolerance(nodes, client, local):
    _, processes = nodes
    torch.testing.assert_close(forward(client, processes["loose"]), local[1], rtol=0, atol=1e-5)


def test_perturbed_block_outside_the_span_refuses_to_start(nodes, tiny_model):
    swarm, _ = nodes
    process = swarm.start_node(
        str(tiny_model), "1:4", "--throughput", "1", "--fault", "perturb:block=5", wait=False, name="outside"
    )
    assert process.popen.wait(timeout=180) == 1
    assert "block 5 is outside this node's span [1, 4)" in process.log()
