"""The swarm map: which nodes serve which blocks of which models, and which blocks nobody serves."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from hivemind.dht import DHT

from swarm.dht.keys import MODELS_KEY, model_info_key
from swarm.dht.swarm_view import read_model_infos, read_swarm
from swarm.proto import swarm_pb2

if TYPE_CHECKING:
    from swarm.models.span import LlamaSpan

STATE_NAMES = {v: k for k, v in swarm_pb2.ServerInfo.State.items()}


def list_models(dht: DHT, timeout: float = 10.0) -> list[str]:
    """Names of the models that nodes announce."""
    return sorted({info.model for info in read_model_infos(dht, MODELS_KEY, timeout)})


def model_map(
    dht: DHT,
    model: str,
    timeout: float = 10.0,
    load_block: Callable[[int], LlamaSpan | None] | None = None,
) -> dict:
    """One model's map: {"model", "num_blocks", "nodes", "blocks", "missing", "unchecked_verdicts"} (the
    `--json` schema). Each node lists the verdicts against it that this process re-checked with
    `load_block`'s weights (swarm.verification.verdicts) and whether they ban it; verdicts it could not
    re-check (no weights, another profile) are only counted."""
    infos = read_model_infos(dht, model_info_key(model), timeout)
    if not infos:
        return {
            "model": model,
            "num_blocks": 0,
            "nodes": [],
            "blocks": [],
            "missing": [],
            "unchecked_verdicts": 0,
        }
    num_blocks = Counter(info.num_blocks for info in infos).most_common(1)[0][0]
    from swarm.verification.determinism import referee_profile
    from swarm.verification.verdicts import VerdictBook, judge_verdicts

    book = VerdictBook(model, num_blocks)
    unchecked = judge_verdicts(
        dht, model, book, load_block or (lambda block: None), referee_profile(), timeout
    )
    banned = book.banned()
    servers, _ = read_swarm(dht, model, num_blocks, timeout)
    nodes = sorted(servers.values(), key=lambda s: (s.start_block, s.end_block, s.peer_id))
    blocks = []
    for index in range(num_blocks):
        serving = [s.peer_id for s in nodes if s.start_block <= index < s.end_block and s.state == s.ONLINE]
        blocks.append({"index": index, "nodes": serving})
    return {
        "model": model,
        "num_blocks": num_blocks,
        "nodes": [
            {
                "peer_id": s.peer_id,
                "start": s.start_block,
                "end": s.end_block,
                "state": STATE_NAMES.get(s.state, str(s.state)),
                "throughput": round(s.throughput, 3),
                "version": s.version,
                "cache_tokens_left": s.cache_tokens_left,
                "reach": reach_of(s),
                "dtype": s.dtype,
                "quant": s.quant or "none",
                # measured by the node from its loaded span (0: a node that does not announce it)
                "bytes_per_block": s.bytes_per_block,
                "verdicts": book.verdicts_against(s.peer_id),
                "banned": s.peer_id in banned,
            }
            for s in nodes
        ],
        "blocks": blocks,
        "missing": [b["index"] for b in blocks if not b["nodes"]],
        "unchecked_verdicts": len(unchecked),
    }


def reach_of(info: swarm_pb2.ServerInfo) -> str:
    """How clients reach a node: "direct", "relayed" (behind NAT, through a relay) or "unreachable"."""
    return "unreachable" if info.unreachable else "relayed" if info.using_relay else "direct"


def format_map(swarm_map: dict) -> str:
    """A text rendering: one row per node with its span drawn over the blocks."""
    lines = [f"model {swarm_map['model']}: {swarm_map['num_blocks']} blocks, {len(swarm_map['nodes'])} nodes"]
    width = swarm_map["num_blocks"]
    for node in swarm_map["nodes"]:
        bar = "".join("#" if node["start"] <= b < node["end"] else "." for b in range(width))
        lines.append(
            f"  {node['peer_id']}  [{node['start']:3d}, {node['end']:3d})  {node['state']:<7}  "
            f"{node['throughput']:9.1f} rps  v{node['version']}  {_weights(node)}  {bar}"
            + ("  BANNED" if node.get("banned") else "")
            + (f"  {node['reach'].upper()}" if node.get("reach", "direct") != "direct" else "")
        )
        for verdict in node.get("verdicts", ()):
            what = f"block {verdict['block']} {verdict['op']} ({verdict['reason']})"
            lines.append(f"    verdict by {verdict['by']}: {what}")
    missing = swarm_map["missing"]
    lines.append(f"  missing blocks: {_ranges(missing) if missing else 'none'}")
    if swarm_map.get("unchecked_verdicts"):
        count = swarm_map["unchecked_verdicts"]
        lines.append(f"  verdicts not re-checked here (no weights or another profile): {count}")
    return "\n".join(lines)


def _weights(node: dict) -> str:
    """e.g. "float32 int8 0.62 MiB/block": the node's dtype, --quant and measured bytes per block."""
    size = f" {node['bytes_per_block'] / 2**20:.2f} MiB/block" if node.get("bytes_per_block") else ""
    return f"{node.get('dtype') or '?'} {node.get('quant', 'none')}{size}"


def _ranges(indices: list[int]) -> str:
    parts, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(f"{start}" if start == index else f"{start}-{index}")
            start = None
    return ", ".join(parts)
