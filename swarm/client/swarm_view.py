"""What the client knows of the swarm: which node serves which blocks, read from the DHT."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from functools import partial

from hivemind.dht import DHT

from swarm.dht.keys import block_key, model_info_key, split_owner_subkey
from swarm.dht.records import RecordError, decode_record
from swarm.proto import swarm_pb2

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteSpan:
    """A node and the part of its span a route uses."""

    peer_id: str
    start: int
    end: int
    info: swarm_pb2.ServerInfo

    def __repr__(self) -> str:
        return f"RemoteSpan({self.peer_id[-8:]}, [{self.start}, {self.end}))"


async def _get_many(_dht, node, keys: list[str]):
    # an infinite "sufficient" expiration makes the search collect the freshest subkeys from every replica
    return await node.get_many(keys, sufficient_expiration_time=float("inf"))


def _entries(found) -> dict:
    if found is None or not isinstance(found.value, dict):
        return {}
    return {subkey: item.value for subkey, item in found.value.items()}


def read_swarm(dht: DHT, model: str, num_blocks: int, timeout: float = 10.0):
    """(ServerInfo per peer id seen for any block, ModelInfo records) from the DHT.

    Records that don't parse, or whose subkey names a different peer than the record, are dropped.
    """
    keys = [block_key(model, b) for b in range(num_blocks)] + [model_info_key(model)]
    found = dht.run_coroutine(partial(_get_many, keys=keys), return_future=True).result(timeout)
    servers: dict[str, swarm_pb2.ServerInfo] = {}
    model_infos: list[swarm_pb2.ModelInfo] = []
    for index, key in enumerate(keys):
        for subkey, value in _entries(found.get(key)).items():
            owner = split_owner_subkey(subkey)
            try:
                record = decode_record(value)
            except RecordError:
                continue
            if owner is None:
                continue
            if isinstance(record, swarm_pb2.ModelInfo):
                if record.model == model and record.num_blocks == num_blocks:
                    model_infos.append(record)
            elif (
                record.peer_id == owner[0]
                and record.model == model
                and record.end_block <= num_blocks
                and record.start_block <= index < record.end_block  # a node that moved leaves stale keys
            ):
                servers[record.peer_id] = record
    return servers, model_infos


def consensus_hashes(model_infos: list[swarm_pb2.ModelInfo]) -> list[str] | None:
    """The block hashes most announcers agree on (None if nobody announced the model)."""
    if not model_infos:
        return None
    votes = Counter(tuple(info.block_hashes) for info in model_infos)
    return list(votes.most_common(1)[0][0])


def usable_servers(
    servers: dict[str, swarm_pb2.ServerInfo],
    expected_hashes: list[str] | None,
    banned: set[str] = frozenset(),
) -> list[swarm_pb2.ServerInfo]:
    """ONLINE servers that are not banned and whose weights hash to the model's."""
    usable = []
    for info in servers.values():
        if info.state != swarm_pb2.ServerInfo.ONLINE or info.peer_id in banned:
            continue
        if (
            expected_hashes is not None
            and list(info.block_hashes) != expected_hashes[info.start_block : info.end_block]
        ):
            logger.warning("skipping node %s: its weights differ from the model's", info.peer_id)
            continue
        usable.append(info)
    return usable
