"""`swarm health` reads the swarm map from the DHT: nodes, spans, states and the blocks nobody serves."""

import json
import subprocess

from swarm.local import run_cli


def health(*args: str) -> subprocess.CompletedProcess:
    return run_cli(["health", *args], timeout=120)


def test_health_json_and_text(tiny_model, tiny_swarm, local_model):
    gappy = tiny_swarm.start_node(str(tiny_model), "0:2", "--model-name", "gappy", "--throughput", "7")
    try:
        result = health("--initial-peers", *tiny_swarm.initial_peers, "--model", "tiny-llama", "--json")
        assert result.returncode == 0, result.stderr
        tiny = json.loads(result.stdout)
        assert tiny["model"] == "tiny-llama" and tiny["num_blocks"] == 6 and tiny["missing"] == []
        online = [n for n in tiny["nodes"] if n["state"] == "ONLINE"]  # others' OFFLINE records may linger
        assert [(n["start"], n["end"]) for n in online] == [(0, 2), (2, 5), (5, 6)]
        assert all(n["throughput"] > 0 for n in online)
        assert [len(b["nodes"]) for b in tiny["blocks"]] == [1] * 6

        # without --model: every model announced, the gap shown
        result = health("--initial-peers", *tiny_swarm.initial_peers, "--json")
        maps = {m["model"]: m for m in map(json.loads, result.stdout.splitlines())}
        assert set(maps) == {"tiny-llama", "gappy"}
        assert maps["gappy"]["missing"] == [2, 3, 4, 5]
        assert maps["gappy"]["nodes"] == [
            {
                "peer_id": gappy.peer_id,
                "start": 0,
                "end": 2,
                "state": "ONLINE",
                "throughput": 7.0,
                "version": maps["gappy"]["nodes"][0]["version"],
                "cache_tokens_left": 32768,
                "reach": "direct",
                "dtype": "float32",
                "quant": "none",
                # as loaded: every parameter of a block, in float32
                "bytes_per_block": sum(p.nbytes for p in local_model.model.layers[0].parameters()),
                "verdicts": [],  # nobody has been convicted
                "banned": False,
            }
        ]
        assert maps["gappy"]["unchecked_verdicts"] == 0
        assert result.returncode == 1  # a model with missing blocks makes the health check fail
        gappy_text = health("--initial-peers", *tiny_swarm.initial_peers, "--model", "gappy")
        assert gappy_text.returncode == 1
        text = gappy_text.stdout
        assert "missing blocks: 2-5" in text and gappy.peer_id in text and "##...." in text
        assert "float32 none 0.14 MiB/block" in text
    finally:
        gappy.terminate()


def test_health_takes_the_model_path_nodes_were_started_with(tiny_model, tiny_swarm):
    by_name = health("--initial-peers", *tiny_swarm.initial_peers, "--model", "tiny-llama", "--json")
    by_path = health("--initial-peers", *tiny_swarm.initial_peers, "--model", str(tiny_model), "--json")
    assert by_path.returncode == 0, by_path.stderr[-2000:]
    named, pathed = json.loads(by_name.stdout), json.loads(by_path.stdout)
    assert pathed["model"] == "tiny-llama" and pathed["num_blocks"] == named["num_blocks"] == 6
    assert [n["peer_id"] for n in pathed["nodes"]] == [n["peer_id"] for n in named["nodes"]]


def test_a_swarm_it_cannot_reach_is_one_line_and_a_hint():
    unreachable = "/ip4/127.0.0.1/tcp/1/p2p/QmVxcREDkArsBxPyiWSSn95vooZ6rXYg6D8Gik5R7Z8VWK"
    result = health("--initial-peers", unreachable, "--timeout", "2")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-2].startswith("swarm health: error: ") and "bootstrap peers" in lines[-2]
    assert lines[-1].startswith("hint: none of --initial-peers answered")
