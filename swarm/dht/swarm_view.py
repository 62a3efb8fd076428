"""Reading the swarm's records back from the DHT: which node serves which blocks, and the model's metadata."""

from __future__ import annotations

from collections import Counter
from functools import partial

from hivemind.dht import DHT

from swarm.dht.keys import block_key, model_info_key, split_owner_subkey, stage_key, trainers_key
from swarm.dht.records import RecordError, decode_record
from swarm.proto import swarm_pb2


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


async def _get_latest(_dht, node, key: str):
    return await node.get(key, latest=True)


def read_model_infos(dht: DHT, key: str, timeout: float = 10.0) -> list[swarm_pb2.ModelInfo]:
    """The ModelInfo records stored under `key` (a model's info key, or the list of all models)."""
    found = dht.run_coroutine(partial(_get_latest, key=key), return_future=True).result(timeout)
    infos = []
    for value in _entries(found).values():
        try:
            record = decode_record(value)
        except RecordError:
            continue
        if isinstance(record, swarm_pb2.ModelInfo):
            infos.append(record)
    return infos


def _read_owned(dht: DHT, key: str, message_type, timeout: float) -> dict:
    """Records of `message_type` under `key`, by peer id; a record must name the peer that signed it."""
    found = dht.run_coroutine(partial(_get_latest, key=key), return_future=True).result(timeout)
    records = {}
    for subkey, value in _entries(found).items():
        owner = split_owner_subkey(subkey)
        try:
            record = decode_record(value)
        except RecordError:
            continue
        if owner is not None and isinstance(record, message_type) and record.peer_id == owner[0]:
            records[record.peer_id] = record
    return records


def read_stage(dht: DHT, run_id: str, stage: int, timeout: float = 10.0) -> dict[str, swarm_pb2.StageInfo]:
    """The peers of one training stage, by peer id (every state, every run file: callers filter)."""
    return _read_owned(dht, stage_key(run_id, stage), swarm_pb2.StageInfo, timeout)


def read_trainers(dht: DHT, run_id: str, timeout: float = 10.0) -> dict[str, swarm_pb2.TrainerInfo]:
    """The trainers of a run, by peer id."""
    return _read_owned(dht, trainers_key(run_id), swarm_pb2.TrainerInfo, timeout)


def live_records(records: dict, run_hash: str) -> list:
    """The ONLINE StageInfo or TrainerInfo records of one run file (by its sha256)."""
    return [
        info
        for info in records.values()
        if info.state == swarm_pb2.ServerInfo.ONLINE and info.run_hash == run_hash
    ]


def consensus_hashes(model_infos: list[swarm_pb2.ModelInfo]) -> list[str] | None:
    """The block hashes most announcers agree on (None if nobody announced the model)."""
    if not model_infos:
        return None
    votes = Counter(tuple(info.block_hashes) for info in model_infos)
    return list(votes.most_common(1)[0][0])
