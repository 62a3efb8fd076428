"""Nodes die (kill -9 of the whole process group) mid-session; generation goes on with the same tokens.

Each span [0, 2), [2, 4), [4, 6) has a preferred node (announced throughput 100) and backups (10, 1),
so the route is predictable: the test knows which node to kill and which one should take over.
"""

import os
import signal
import threading

import pytest
import torch

from swarm.client import DistributedModelForCausalLM
from swarm.local import LocalSwarm

pytestmark = pytest.mark.slow

SPANS = ["0:2", "2:4", "4:6"]
PROMPT_LEN = 12
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(3, 256, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def expected(local_model, input_ids):
    with torch.no_grad():
        return local_model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)


class Swarm:
    """A local swarm whose nodes are indexed by (span, rank): rank 0 is preferred, then 1, 2."""

    def __init__(self, tiny_model, workdir, copies=2):
        self.model_path = str(tiny_model)
        self.local = LocalSwarm(workdir=workdir)
        self.local.start_bootstrap()
        self.nodes = {}
        pending = []
        for rank in range(copies):
            for span in SPANS:
                pending.append(((span, rank), self.start(span, rank, wait=False)))
        for key, process in pending:
            self.nodes[key] = self.local.wait_ready(process)

    def start(self, span, rank, wait=True):
        throughput = str(100 / 10**rank)
        process = self.local.start_node(
            self.model_path, span, "--throughput", throughput, "--update-period", "2", wait=wait
        )
        if wait:
            self.nodes[(span, rank)] = process
        return process

    def kill(self, span, rank):
        self.nodes[(span, rank)].kill()

    def peer(self, span, rank):
        return self.nodes[(span, rank)].peer_id

    def close(self):
        # SIGKILL: graceful exits (tested elsewhere) would wait on DHT peers these tests killed
        for process in self.local.processes:
            process.kill()
        self.local.close()


@pytest.fixture
def swarm(tiny_model, tmp_path):
    swarm = Swarm(tiny_model, tmp_path / "swarm")
    yield swarm
    swarm.close()


@pytest.fixture
def client(tiny_model, swarm, request):
    """A client of the swarm; parametrized indirectly with "push", its steps go node to node."""
    push = getattr(request, "param", "client") == "push"
    with DistributedModelForCausalLM.from_pretrained(
        tiny_model, swarm.local.initial_peers, request_timeout=20, max_retries=5, push=push
    ) as model:
        yield model


# recovery must give the same text whether the client drives the chain or the nodes push steps along it
both_modes = pytest.mark.parametrize("client", ["client", "push"], indirect=True)


def kill_at(session, position, action):
    """Run `action` once, right after the step that brings the session to `position` or beyond."""
    done = threading.Event()

    def on_step(new_position):
        if new_position >= position and not done.is_set():
            done.set()
            action()

    session.on_step = on_step
    return done


def route_peers(session):
    return [(span.start, span.end, span.peer_id) for span in session.route]


@pytest.mark.parametrize(
    "kill_position, victim",
    [
        (4, "2:4"),  # during prefill (the 12-token prompt goes in chunks of 4)
        (PROMPT_LEN + 32, "2:4"),  # in the middle of a 64-token greedy generation
        (PROMPT_LEN + NEW_TOKENS - 2, "4:6"),  # before the last token's step
        (PROMPT_LEN + 20, "0:2"),  # the first span
    ],
    ids=["prefill", "middle", "last-token", "first-span"],
)
@both_modes
def test_node_killed_mid_generation(swarm, client, input_ids, expected, kill_position, victim):
    client.client_config.max_step_tokens = 4
    with client.inference_session(max_length=PROMPT_LEN + NEW_TOKENS) as session:
        killed = kill_at(session, kill_position, lambda: swarm.kill(victim, 0))
        out = client.generate(input_ids, max_new_tokens=NEW_TOKENS, session=session)
        assert killed.is_set()
        assert torch.equal(out, expected)
        assert session.num_recoveries == 1
        if client.client_config.push:  # the last span got most steps pushed, not from the client
            assert session._spans[-1].stream.num_sent < NEW_TOKENS // 2
        # only the lost span moved; the spans before and after kept their nodes and caches
        assert route_peers(session) == [
            (int(span[0]), int(span[2]), swarm.peer(span, 1 if span == victim else 0)) for span in SPANS
        ]


@both_modes
def test_nodes_die_between_chunks_then_new_nodes_replace_the_last_originals(
    swarm, client, input_ids, expected
):
    with client.inference_session(max_length=PROMPT_LEN + NEW_TOKENS) as session:
        out = client.generate(input_ids, max_new_tokens=16, session=session)
        assert torch.equal(out, expected[:, : PROMPT_LEN + 16])
        swarm.kill("0:2", 0)
        swarm.kill("4:6", 0)
        out = client.generate(None, max_new_tokens=16, session=session)
        assert torch.equal(out, expected[:, : PROMPT_LEN + 32])
        assert route_peers(session) == [
            (0, 2, swarm.peer("0:2", 1)),
            (2, 4, swarm.peer("2:4", 0)),
            (4, 6, swarm.peer("4:6", 1)),
        ]
        # fresh volunteers join, then every node the session started with is gone
        for span in SPANS:
            swarm.start(span, 2)
        for span, rank in [("2:4", 0), ("0:2", 1), ("2:4", 1), ("4:6", 1)]:
            swarm.kill(span, rank)
        out = client.generate(None, max_new_tokens=NEW_TOKENS - 32, session=session)
        assert torch.equal(out, expected)
        assert route_peers(session) == [(int(span[0]), int(span[2]), swarm.peer(span, 2)) for span in SPANS]


def test_a_frozen_node_is_left_after_the_liveness_period_not_the_request_timeout(
    tiny_model, swarm, input_ids, expected
):
    """SIGSTOP of a node's whole process group (a frozen machine, a cut link): its open stream stays silent,
    with no reset. The request timeout here is longer than the test may run, so only the liveness probe
    (a new stream to the node, unanswered) can move the session on."""
    frozen = swarm.nodes[("2:4", 0)]
    with DistributedModelForCausalLM.from_pretrained(
        tiny_model, swarm.local.initial_peers, request_timeout=600, liveness_period=2, max_retries=5
    ) as client:
        with client.inference_session(max_length=PROMPT_LEN + NEW_TOKENS) as session:
            froze = kill_at(session, PROMPT_LEN + 8, lambda: os.killpg(frozen.popen.pid, signal.SIGSTOP))
            try:
                out = client.generate(input_ids, max_new_tokens=NEW_TOKENS, session=session)
            finally:
                os.killpg(frozen.popen.pid, signal.SIGCONT)
            assert froze.is_set()
            assert torch.equal(out, expected)
            assert session.num_recoveries == 1
            assert route_peers(session)[1] == (2, 4, swarm.peer("2:4", 1))
