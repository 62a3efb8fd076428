"""The live swarm map page (`swarm health --serve`, `swarm gateway --map-port`), rendered by a real
headless Chromium against the tiny swarm of real nodes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from swarm.local.processes import ManagedProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs Debian's chromium (.ci/run) and sets this: there the test must run, not be skipped
REQUIRED = os.environ.get("SWARM_REQUIRE_CHROMIUM") == "1"


@pytest.fixture(scope="module")
def map_url(tiny_swarm, tmp_path_factory):
    log = tmp_path_factory.mktemp("map") / "health.log"
    args = [sys.executable, "-m", "swarm.cli.main", "health", "--serve", "0"]
    process = ManagedProcess("health-map", [*args, "--initial-peers", *tiny_swarm.initial_peers], log)
    try:
        yield process.wait_for(re.compile(r"map at (http://\S+/)"), 60).group(1)
    finally:
        process.terminate()


def chromium(*args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        if REQUIRED:
            pytest.fail("chromium is not installed (Debian package `chromium`), and SWARM_REQUIRE_CHROMIUM=1")
        pytest.skip("needs Debian's `chromium` for a headless browser (CI installs it)")
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_the_map_json_is_the_health_map(map_url, tiny_nodes):
    data = json.loads(urllib.request.urlopen(map_url + "map.json", timeout=60).read())
    (tiny,) = [m for m in data["models"] if m["model"] == "tiny-llama"]
    online = {n["peer_id"] for n in tiny["nodes"] if n["state"] == "ONLINE"}
    assert online == {p.peer_id for p in tiny_nodes}
    assert tiny["num_blocks"] == 6 and tiny["missing"] == []
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(map_url + "nothing-here", timeout=10)
    assert missing.value.code == 404


def test_a_browser_renders_every_node_and_block(map_url, tiny_nodes, tmp_path):
    rendered = chromium("--virtual-time-budget=15000", "--dump-dom", map_url)
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    # other tests' models may be on the map too (a stopped node's record lingers): read tiny-llama's part
    section = re.search(r'<section[^>]*data-model="tiny-llama"[^>]*>(.*?)</section>', rendered.stdout, re.S)
    assert section, rendered.stdout[-3000:]
    dom = section.group(1)
    assert "every block is served" in dom
    for process in tiny_nodes:  # each node's row, with its span
        assert f'data-peer="{process.peer_id}"' in dom
        assert f"[{process.span[0]}, {process.span[1]})" in dom
    assert re.findall(r'class="block n\d"', dom) == ['class="block n1"'] * 6  # a square per block, 1 node
    screenshot = tmp_path / "map.png"
    shot = chromium(
        f"--screenshot={screenshot}", "--window-size=1100,700", "--virtual-time-budget=15000", map_url
    )
    assert shot.returncode == 0 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
