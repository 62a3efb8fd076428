"""A background loop that keeps a node's records alive in the DHT."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial

from hivemind.dht import DHT
from hivemind.utils.timed_storage import get_dht_time

from swarm.dht.keys import MODELS_KEY, block_key, model_info_key, owner_subkey
from swarm.dht.records import Record, encode_record
from swarm.proto import swarm_pb2

logger = logging.getLogger(__name__)


async def _store_many(_dht, node, keys, values, expiration_time, subkey, await_all_replicas) -> bool:
    # runs inside the DHT process, so it must be a picklable module-level function
    results = await node.store_many(
        keys, values, expiration_time, subkeys=[subkey] * len(keys), await_all_replicas=await_all_replicas
    )
    return all(results.values())


def store_records(
    dht: DHT,
    owner_public_key: bytes,
    peer_id: str,
    entries: list[tuple[str, Record]],
    expiration: float,
    timeout: float = 10.0,
    await_all_replicas: bool = False,
    tag: str = "",
) -> bool:
    """Store records in `peer_id`'s name: each (key, message) under the peer's signed owner subkey (the one
    for `tag`: a later store with the same tag replaces the record, one with another tag does not)."""
    # one encoded value per distinct message, shared by its keys: pickle then sends it once. hivemind's
    # DHT process reads its pipe non-blocking and breaks on a message above the pipe buffer (64 KiB);
    # a ServerInfo copied under each of 30 blocks used to exceed it
    encoded: dict[int, dict] = {}
    values = [encoded.setdefault(id(message), encode_record(message)) for _, message in entries]
    store = partial(
        _store_many,
        keys=[key for key, _ in entries],
        values=values,
        expiration_time=get_dht_time() + expiration,
        subkey=owner_subkey(peer_id, owner_public_key, tag),
        await_all_replicas=await_all_replicas,
    )
    try:
        return bool(dht.run_coroutine(store, return_future=True).result(timeout))
    except Exception as e:
        logger.warning("failed to announce %s in the DHT: %r", peer_id, e)
        return False


def store_node_records(
    dht: DHT,
    owner_public_key: bytes,
    server_info: swarm_pb2.ServerInfo,
    model_info: swarm_pb2.ModelInfo | None,
    expiration: float,
    timeout: float = 10.0,
    await_all_replicas: bool = False,
    extra_blocks: tuple[int, ...] = (),
) -> bool:
    """Store ServerInfo under every served block (and ModelInfo) with a signed owner subkey.

    A peer about to leave must await all replicas: its own DHT storage goes away with it. A node that
    moved also writes its new info under the blocks it left (`extra_blocks`), replacing the old record.
    """
    blocks = sorted(set(range(server_info.start_block, server_info.end_block)) | set(extra_blocks))
    entries: list[tuple[str, Record]] = [(block_key(server_info.model, b), server_info) for b in blocks]
    if model_info is not None:
        entries += [(model_info_key(model_info.model), model_info), (MODELS_KEY, model_info)]
    return store_records(
        dht, owner_public_key, server_info.peer_id, entries, expiration, timeout, await_all_replicas
    )


class RecordAnnouncer(threading.Thread):
    """Calls `publish(expiration, final)` every `update_period`; records expire after twice that.

    `publish` stores the peer's current records; `final=True` is its last call (e.g. OFFLINE), which
    must reach every replica because the peer's own DHT storage leaves with it.
    """

    def __init__(
        self, publish: Callable[[float, bool], object], update_period: float, min_interval: float = 0.0
    ):
        super().__init__(name="swarm-announcer", daemon=True)
        self.publish, self.update_period = publish, update_period
        self.min_interval = min_interval  # announce_now() publishes at most this often
        self.stop_event = threading.Event()
        self.trigger = threading.Event()

    @property
    def expiration(self) -> float:
        return max(2 * self.update_period, 3.0)

    def announce_now(self) -> None:
        """Announce on the next loop iteration without waiting for the period to pass."""
        self.trigger.set()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.publish(self.expiration, False)
            self.stop_event.wait(self.min_interval)
            self.trigger.wait(self.update_period)
            self.trigger.clear()

    def stop(self, final: bool = True) -> None:
        """Stop the loop; publish once more with final=True if asked."""
        self.stop_event.set()
        self.trigger.set()
        if self.is_alive():
            self.join(timeout=self.update_period + 10)
        if final:
            self.publish(self.expiration, True)


class Announcer(RecordAnnouncer):
    """Keeps a serving node's ServerInfo (and ModelInfo) alive in the DHT."""

    def __init__(
        self,
        dht: DHT,
        owner_public_key: bytes,
        get_server_info: Callable[[], swarm_pb2.ServerInfo],
        model_info: swarm_pb2.ModelInfo | None,
        update_period: float,
    ):
        super().__init__(self._publish, update_period)
        self.dht, self.owner_public_key = dht, owner_public_key
        self.get_server_info, self.model_info = get_server_info, model_info
        self._final_info: swarm_pb2.ServerInfo | None = None

    def _publish(self, expiration: float, final: bool) -> None:
        if final:
            store_node_records(
                self.dht, self.owner_public_key, self._final_info, None, expiration, await_all_replicas=True
            )
        else:
            store_node_records(
                self.dht, self.owner_public_key, self.get_server_info(), self.model_info, expiration
            )

    def stop(self, final_info: swarm_pb2.ServerInfo | None = None) -> None:
        """Stop the loop; announce `final_info` (e.g. OFFLINE) once if given."""
        self._final_info = final_info
        super().stop(final=final_info is not None)
