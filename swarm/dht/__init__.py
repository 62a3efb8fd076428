"""Discovery: record schemas, keys, signing, the DHT factory and the announcer loop."""

from swarm.dht.factory import create_dht
from swarm.dht.keys import block_key, model_info_key
from swarm.dht.records import RecordKind, SwarmRecordValidator, decode_record, encode_record

__all__ = [
    "create_dht",
    "block_key",
    "model_info_key",
    "RecordKind",
    "SwarmRecordValidator",
    "decode_record",
    "encode_record",
]
