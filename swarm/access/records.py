"""Encryption of every DHT value a private swarm writes (AES-256-GCM under the swarm key).

A hivemind record validator that runs last when signing (so it seals the value already signed by
RSASignatureValidator) and first when validating (so the other validators see the plain value). The key,
subkey and expiration time are authenticated data: a sealed value can't be moved to another key or kept
alive longer. A value not sealed with an accepted key is invalid, so members drop outsiders' records (and
refuse to store them) and outsiders read nothing.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer

from swarm.access.keys import KEY_ID_BYTES, Keyring, key_id

MAGIC = b"\xa7swk1"
NONCE_BYTES = 12


def _associated_data(record: DHTRecord) -> bytes:
    return MSGPackSerializer.dumps([record.key, record.subkey, record.expiration_time])


def seal(key: bytes, record: DHTRecord) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + key_id(key) + nonce + AESGCM(key).encrypt(nonce, record.value, _associated_data(record))


def open_sealed(keys: list[bytes], record: DHTRecord) -> bytes | None:
    """The plain value, or None if it is not sealed with one of `keys` or was altered."""
    value = record.value
    header = len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES
    if not isinstance(value, bytes) or len(value) < header + 16 or not value.startswith(MAGIC):
        return None
    tag = value[len(MAGIC) : len(MAGIC) + KEY_ID_BYTES]
    nonce = value[len(MAGIC) + KEY_ID_BYTES : header]
    for key in keys:
        if key_id(key) == tag:
            try:
                return AESGCM(key).decrypt(nonce, value[header:], _associated_data(record))
            except Exception:
                return None
    return None


class EncryptedRecordValidator(RecordValidatorBase):
    """Seals values with the swarm's current key; accepts values sealed with any key it still accepts."""

    def __init__(self, keyring: Keyring):
        self.keyring = keyring

    def sign_value(self, record: DHTRecord) -> bytes:
        return seal(self.keyring.write_key(), record)

    def validate(self, record: DHTRecord) -> bool:
        return open_sealed(self.keyring.accepted(), record) is not None

    def strip_value(self, record: DHTRecord) -> bytes:
        plain = open_sealed(self.keyring.accepted(), record)
        return plain if plain is not None else b""  # only called after validate() passed

    @property
    def priority(self) -> int:
        return 20  # above RSASignatureValidator (10): seals last, opens first

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, EncryptedRecordValidator)  # one swarm key per peer
