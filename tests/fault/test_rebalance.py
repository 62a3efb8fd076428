"""Placement with --num-blocks, rebalancing when the nodes serving some blocks vanish, and a move under a
client's session."""

import time

import pytest
import torch

from swarm.dht.factory import create_dht
from swarm.dht.swarm_map import model_map
from swarm.local import LocalSwarm
from swarm.models.tiny import write_tiny_llama

pytestmark = pytest.mark.slow

RECOVERY_TIMEOUT = 60.0


def coverage(dht):
    swarm_map = model_map(dht, "tiny-llama-12")
    online = {n["peer_id"]: (n["start"], n["end"]) for n in swarm_map["nodes"] if n["state"] == "ONLINE"}
    return swarm_map, online


def test_num_blocks_covers_the_model_and_survivors_move_to_fill_a_gap(tmp_path):
    model = write_tiny_llama(tmp_path / "tiny-llama-12", num_blocks=12)
    with LocalSwarm(workdir=tmp_path / "swarm") as swarm:
        swarm.start_bootstrap()
        nodes = [
            swarm.start_node(
                str(model),
                None,
                "--num-blocks",
                "6",
                "--throughput",
                "10",
                "--update-period",
                "1",
                "--balance-period",
                "2",
            )
            for _ in range(4)  # one after another, as volunteers join
        ]
        dht, _ = create_dht(swarm.initial_peers, client_mode=True)
        try:
            swarm_map, online = coverage(dht)
            assert swarm_map["missing"] == []
            assert sorted(online.values()) == [(0, 6), (0, 6), (6, 12), (6, 12)]

            serving_block_0 = [p for p in nodes if online[p.peer_id][0] == 0]
            for process in serving_block_0:
                process.kill()
            killed = {p.peer_id for p in serving_block_0}
            started = time.monotonic()
            while True:
                swarm_map, online = coverage(dht)
                alive = {peer: span for peer, span in online.items() if peer not in killed}
                covered = set().union(*(range(*span) for span in alive.values()))
                if covered == set(range(12)):
                    break
                assert time.monotonic() - started < RECOVERY_TIMEOUT, f"still uncovered: {swarm_map}"
                time.sleep(0.5)
            assert sorted(alive.values()) == [(0, 6), (6, 12)]
            moved = [p for p in nodes if p.peer_id in alive and "moving from blocks" in p.log()]
            assert len(moved) == 1
        finally:
            dht.shutdown()


def test_a_node_that_moves_mid_session_announces_at_once_and_the_session_goes_on(
    tiny_model, local_swarm, local_model
):
    """The client's session runs through A [0, 3) and B [3, 6); C joins [3, 6) with 10x B's throughput,
    so B moves to [0, 3) while the session holds a cache on it. The DHT shows B's new span at once (not
    after --update-period), B's next step for the old span is refused as moved, and the client re-routes
    to C and replays without banning B: the text equals local greedy."""
    from swarm.client import DistributedModelForCausalLM

    swarm = local_swarm
    swarm.start_bootstrap()
    slow_updates = ("--update-period", "60")  # only the move itself can announce B's new span in time
    swarm.start_node(str(tiny_model), "0:3", "--throughput", "10", *slow_updates)
    mover = swarm.start_node(
        str(tiny_model),
        None,
        "--num-blocks",
        "3",
        "--throughput",
        "10",
        "--balance-period",
        "1",
        *slow_updates,
    )
    assert "serving blocks [3, 6)" in mover.log()
    input_ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = local_model.generate(input_ids, max_new_tokens=24, do_sample=False)

    dht, _ = create_dht(swarm.initial_peers, client_mode=True)
    moved = {}

    def join_and_wait_for_the_move():
        moved["newcomer"] = swarm.start_node(str(tiny_model), "3:6", "--throughput", "100", *slow_updates)
        mover.wait_for("node .* serving blocks \\[0, 3\\)", timeout=60)
        moved["at"] = time.monotonic()
        started = time.monotonic()
        while time.monotonic() - started < 10:
            nodes = model_map(dht, "tiny-llama")["nodes"]
            spans = {n["peer_id"]: (n["start"], n["end"]) for n in nodes if n["state"] == "ONLINE"}
            if spans.get(mover.peer_id) == (0, 3):
                moved["announced_after"] = time.monotonic() - moved["at"]
                return
            time.sleep(0.2)

    try:
        with DistributedModelForCausalLM.from_pretrained(
            tiny_model, swarm.initial_peers, request_timeout=20, max_retries=5
        ) as model:
            with model.inference_session(max_length=32) as session:

                def on_step(position):
                    if position >= 16 and "at" not in moved:
                        join_and_wait_for_the_move()

                session.on_step = on_step
                out = model.generate(input_ids, max_new_tokens=24, do_sample=False, session=session)
                route = [(span.start, span.end, span.peer_id) for span in session.route]
                recoveries = session.num_recoveries
            assert "at" in moved, mover.log()[-3000:]
            assert "announced_after" in moved, "the move was not in the DHT 10 s later"
            assert torch.equal(out, expected)
            assert recoveries == 1
            assert route[-1] == (3, 6, moved["newcomer"].peer_id)
            assert model.bans.failures(mover.peer_id) == 0  # it moved, it did not fail
    finally:
        dht.shutdown()
