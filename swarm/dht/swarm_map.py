"""The swarm map: which nodes serve which blocks of which models, and which blocks nobody serves."""

from __future__ import annotations

from collections import Counter

from hivemind.dht import DHT

from swarm.dht.keys import MODELS_KEY, model_info_key
from swarm.dht.swarm_view import read_model_infos, read_swarm
from swarm.proto import swarm_pb2

STATE_NAMES = {v: k for k, v in swarm_pb2.ServerInfo.State.items()}


def list_models(dht: DHT, timeout: float = 10.0) -> list[str]:
    """Names of the models that nodes announce."""
    return sorted({info.model for info in read_model_infos(dht, MODELS_KEY, timeout)})


def model_map(dht: DHT, model: str, timeout: float = 10.0) -> dict:
    """One model's map: {"model", "num_blocks", "nodes", "blocks", "missing"} (the `--json` schema)."""
    infos = read_model_infos(dht, model_info_key(model), timeout)
    if not infos:
        return {"model": model, "num_blocks": 0, "nodes": [], "blocks": [], "missing": []}
    num_blocks = Counter(info.num_blocks for info in infos).most_common(1)[0][0]
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
            }
            for s in nodes
        ],
        "blocks": blocks,
        "missing": [b["index"] for b in blocks if not b["nodes"]],
    }


def format_map(swarm_map: dict) -> str:
    """A text rendering: one row per node with its span drawn over the blocks."""
    lines = [f"model {swarm_map['model']}: {swarm_map['num_blocks']} blocks, {len(swarm_map['nodes'])} nodes"]
    width = swarm_map["num_blocks"]
    for node in swarm_map["nodes"]:
        bar = "".join("#" if node["start"] <= b < node["end"] else "." for b in range(width))
        lines.append(
            f"  {node['peer_id']}  [{node['start']:3d}, {node['end']:3d})  {node['state']:<7}  "
            f"{node['throughput']:9.1f} rps  v{node['version']}  {bar}"
        )
    missing = swarm_map["missing"]
    lines.append(f"  missing blocks: {_ranges(missing) if missing else 'none'}")
    return "\n".join(lines)


def _ranges(indices: list[int]) -> str:
    parts, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(f"{start}" if start == index else f"{start}-{index}")
            start = None
    return ", ".join(parts)
