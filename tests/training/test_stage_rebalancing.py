"""Stage rebalancing in training: a peer of the strongest stage moves to the weakest one, loads its state
from the peers there and gets traffic; a balanced run stays put."""

from __future__ import annotations

import re
import threading
import time

import pytest
from training_helpers import CORPUS, write_test_run

from swarm.training.state import fetch_progress
from swarm.training.trainer import SwarmTrainer

BALANCE_PERIOD = 2.0  # seconds (randomized by +-50%)
# every peer announces the same throughput, so the load is the number of peers per stage: 3:1 at the start
BALANCING = ("--update-period", "1", "--throughput", "10", "--balance-period", str(BALANCE_PERIOD))
# enough steps that the trainer still trains once a peer moved (moves come 1 to 3 s after start-up)
STEPS = 30
MOVED = re.compile(r"moved from stage (\d+) to stage (\d+)")


@pytest.mark.slow
# on a loaded machine the trainer may finish its steps before the mover's first sample: run it again
@pytest.mark.flaky(reruns=1)
def test_a_peer_moves_from_the_strongest_stage_to_the_weakest(train_model, local_swarm, tmp_path):
    run = write_test_run(tmp_path / "run.toml", train_model, "balancetest", lr=3e-3)
    local_swarm.start_bootstrap()
    nodes = [
        local_swarm.start_training_node(run.path, stage, *BALANCING, wait=False) for stage in (0, 0, 0, 1)
    ]
    for node in nodes:
        local_swarm.wait_ready(node)
    trainer = SwarmTrainer(run, local_swarm.initial_peers, data=CORPUS, update_period=1.0, concurrency=2)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(steps=trainer.train(STEPS)), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        movers = []
        while not movers and time.monotonic() < deadline:
            movers = [node for node in nodes[:3] if MOVED.search(node.log())]
            time.sleep(0.5)
        assert len(movers) == 1, [node.log()[-2000:] for node in nodes]
        mover = movers[0]
        log = mover.log()
        assert MOVED.search(log).groups() == ("0", "1")
        # it took stage 1's state from the peer there before serving it
        assert re.search(r"loaded stage 1 at step \d+ from " + nodes[3].peer_id, log), log[-3000:]

        # it gets stage 1's traffic: backward calls add samples toward its next step
        client = trainer.client
        deadline, samples = time.monotonic() + 60, 0
        while samples == 0 and time.monotonic() < deadline:
            try:
                _, samples, _ = client.run_async(fetch_progress(client.p2p, mover.peer_id, run.sha256, 10))
            except TimeoutError:
                pass
            time.sleep(0.1)
        assert samples > 0
        thread.join(timeout=240)
        assert not thread.is_alive()
        assert [s.step for s in result["steps"]] == list(
            range(1, STEPS + 1)
        )  # the move cost the trainer nothing
        assert mover.peer_id not in client.bans  # a peer that moved away is not banned
        # nor accused by the validators of the stage it joined (its first rounds there check out)
        assert not [node.peer_id for node in nodes if "accusing" in node.log()]

        # 2:2 is balanced: over several more periods nobody moves (back or on)
        time.sleep(4 * BALANCE_PERIOD * 1.5)
        assert [len(MOVED.findall(node.log())) for node in nodes] == [
            1 if node is mover else 0 for node in nodes
        ]
    finally:
        trainer.close()
        thread.join(timeout=60)
