"""Imports point down: client and node share the protocol, DHT and model layers, never each other."""

from __future__ import annotations

import ast
import gc
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "swarm"


def _parse(path: Path) -> ast.Module:
    # CPython 3.11's AST constructor fails (SystemError: recursion depth mismatch) when a garbage collection
    # in the middle of it runs a finalizer that logs: earlier tests leave such objects (P2P clients' tasks)
    gc.collect()
    gc.disable()
    try:
        return ast.parse(path.read_text())
    finally:
        gc.enable()


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _crossing(layer: str, forbidden: str) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        for name in sorted(_imported_modules(path))
        if name == forbidden or name.startswith(forbidden + ".")
    ]


def test_node_never_imports_the_client():
    assert _crossing("node", "swarm.client") == []


def test_client_never_imports_the_node():
    assert _crossing("client", "swarm.node") == []


def test_the_gateway_is_a_client_of_the_swarm():
    """The gateway serves through the client SDK: it never reaches into nodes or training."""
    assert _crossing("gateway", "swarm.node") == [] and _crossing("gateway", "swarm.training") == []
    assert _crossing("client", "swarm.gateway") == []


def test_importing_the_client_loads_no_node_code():
    """A fresh interpreter: the client SDK must not pull in the node or its span backend."""
    code = (
        "import json, sys; from swarm.client import DistributedModelForCausalLM, SwarmClient; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('swarm.'))))"
    )
    command = [sys.executable, "-c", code]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "swarm.client.model" in loaded and "swarm.protocol.node" in loaded  # the check sees real imports
    assert [m for m in loaded if m.startswith("swarm.node")] == []
    assert "swarm.models.span" not in loaded


def test_node_servicer_implements_exactly_the_protocol():
    """Every rpc_* the node serves is declared, with the same types, in the protocol clients use."""
    import typing

    from swarm.node.handler import NodeServicer
    from swarm.protocol import NodeProtocol

    def signatures(cls, own_only: bool):
        members = vars(cls) if own_only else {n: getattr(cls, n) for n in dir(cls)}
        return {name: typing.get_type_hints(fn) for name, fn in members.items() if name.startswith("rpc_")}

    served, declared = signatures(NodeServicer, own_only=True), signatures(NodeProtocol, own_only=True)
    assert set(served) == set(declared)
    for name, hints in served.items():
        assert {k: v for k, v in hints.items() if k != "context"} == {
            k: v for k, v in declared[name].items() if k != "context"
        }, name
    assert NodeServicer._get_handle_name(None, "rpc_info") == NodeProtocol._get_handle_name(None, "rpc_info")
