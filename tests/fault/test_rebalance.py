"""Placement with --num-blocks, and rebalancing when the nodes serving some blocks vanish."""

import time

import pytest

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
