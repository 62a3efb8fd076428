"""A background loop that keeps a node's records alive in the DHT."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial

from hivemind.dht import DHT
from hivemind.utils.timed_storage import get_dht_time

from swarm.dht.keys import MODELS_KEY, block_key, model_info_key, owner_subkey
from swarm.dht.records import encode_record
from swarm.proto import swarm_pb2

logger = logging.getLogger(__name__)


async def _store_many(_dht, node, keys, values, expiration_time, subkey, await_all_replicas) -> bool:
    # runs inside the DHT process, so it must be a picklable module-level function
    results = await node.store_many(
        keys, values, expiration_time, subkeys=[subkey] * len(keys), await_all_replicas=await_all_replicas
    )
    return all(results.values())


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
    subkey = owner_subkey(server_info.peer_id, owner_public_key)
    expiration_time = get_dht_time() + expiration
    value = encode_record(server_info)
    blocks = sorted(set(range(server_info.start_block, server_info.end_block)) | set(extra_blocks))
    keys = [block_key(server_info.model, b) for b in blocks]
    values = [value] * len(keys)
    if model_info is not None:
        keys += [model_info_key(model_info.model), MODELS_KEY]
        values += [encode_record(model_info)] * 2

    store = partial(
        _store_many,
        keys=keys,
        values=values,
        expiration_time=expiration_time,
        subkey=subkey,
        await_all_replicas=await_all_replicas,
    )
    try:
        return bool(dht.run_coroutine(store, return_future=True).result(timeout))
    except Exception as e:
        logger.warning("failed to announce %s in the DHT: %r", server_info.peer_id, e)
        return False


class Announcer(threading.Thread):
    """Re-announces the node's records every `update_period`; they expire after twice that."""

    def __init__(
        self,
        dht: DHT,
        owner_public_key: bytes,
        get_server_info: Callable[[], swarm_pb2.ServerInfo],
        model_info: swarm_pb2.ModelInfo | None,
        update_period: float,
    ):
        super().__init__(name="swarm-announcer", daemon=True)
        self.dht, self.owner_public_key = dht, owner_public_key
        self.get_server_info, self.model_info = get_server_info, model_info
        self.update_period = update_period
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
            info = self.get_server_info()
            store_node_records(self.dht, self.owner_public_key, info, self.model_info, self.expiration)
            self.trigger.wait(self.update_period)
            self.trigger.clear()

    def stop(self, final_info: swarm_pb2.ServerInfo | None = None) -> None:
        """Stop the loop; announce `final_info` (e.g. OFFLINE) once if given."""
        self.stop_event.set()
        self.trigger.set()
        if self.is_alive():
            self.join(timeout=self.update_period + 10)
        if final_info is not None:
            store_node_records(
                self.dht, self.owner_public_key, final_info, None, self.expiration, await_all_replicas=True
            )
