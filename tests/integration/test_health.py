"""`swarm health` reads the swarm map from the DHT: nodes, spans, states and the blocks nobody serves."""

import json
import subprocess
import sys


def health(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "swarm.cli.main", "health", *args], capture_output=True, text=True, timeout=120
    )


def test_health_json_and_text(tiny_model, tiny_swarm):
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
    finally:
        gappy.terminate()
