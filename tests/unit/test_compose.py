"""docker-compose.yml and Dockerfile stay honest: no Docker engine runs here, so we check every command
against the real CLI parser, every referenced file, and the bootstrap address against its identity."""

import re
import shlex
from pathlib import Path

import yaml

from swarm.cli.main import build_parser
from swarm.dht.identity import load_identity, peer_id_of

ROOT = Path(__file__).resolve().parents[2]


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def parse_swarm_command(argv: list[str]):
    assert argv[0] == "swarm", argv
    return build_parser().parse_args(argv[1:])


def test_compose_has_the_services_healthchecks_and_shared_cache():
    services = compose()["services"]
    assert {"bootstrap", "node", "client"} <= set(services)
    assert services["node"]["deploy"]["replicas"] == 3
    for name in ("bootstrap", "node"):
        assert services[name]["healthcheck"]["test"], name
    assert "model-cache:/cache" in services["node"]["volumes"]
    assert "model-cache:/cache" in services["client"]["volumes"]
    assert "model-cache" in compose()["volumes"]
    assert services["client"]["depends_on"]["node"]["condition"] == "service_healthy"


def test_every_command_parses_with_the_real_cli():
    services = compose()["services"]
    bootstrap = parse_swarm_command(services["bootstrap"]["command"])
    assert bootstrap.command == "dht" and bootstrap.port == 31337
    node = parse_swarm_command(services["node"]["command"])
    assert node.command == "node" and node.num_blocks == 10 and node.blocks is None
    health = parse_swarm_command(services["node"]["healthcheck"]["test"][1:])
    assert health.command == "health" and health.json
    # the client's shell line: `swarm generate ... | tee ... && grep -q Paris ...`
    script = services["client"]["command"][0]
    generate_line = script.split("|")[0].replace(
        "$$BOOTSTRAP", services["client"]["environment"]["BOOTSTRAP"]
    )
    client = parse_swarm_command(shlex.split(generate_line))
    assert client.command == "generate" and client.chat and "Paris" in script
    api = parse_swarm_command(services["api"]["command"])
    assert api.command == "api" and api.port == 8000 and api.host == "0.0.0.0"
    assert services["api"]["ports"] == [f"127.0.0.1:{api.port}:{api.port}"]


def test_bootstrap_address_matches_the_committed_identity():
    services = compose()["services"]
    identity_in_container = Path(
        services["bootstrap"]["command"][services["bootstrap"]["command"].index("--identity") + 1]
    )
    identity = ROOT / identity_in_container.relative_to("/app")
    assert identity.is_file()
    peer_id = peer_id_of(load_identity(identity))
    node = parse_swarm_command(services["node"]["command"])
    assert node.initial_peers == [f"/dns4/bootstrap/tcp/31337/p2p/{peer_id}"]
    assert services["client"]["environment"]["BOOTSTRAP"] == node.initial_peers[0]


def test_dockerfile_installs_cpu_torch_first_and_copies_what_exists():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    assert re.search(r"ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu", dockerfile)
    torch_at = dockerfile.index('pip install "torch==')
    assert torch_at < dockerfile.index("RUN pip install .")
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
    assert 'ENTRYPOINT ["swarm"]' in dockerfile
