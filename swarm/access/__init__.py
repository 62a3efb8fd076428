"""Private swarms: swarm keys, record encryption and membership proofs (a swarm without a key is public)."""

from swarm.access.keys import SWARM_KEY_ENV, Keyring, create_key_file, load_keyring, rotate_key_file
from swarm.access.membership import membership_for, register_membership
from swarm.access.records import EncryptedRecordValidator

__all__ = [
    "SWARM_KEY_ENV",
    "Keyring",
    "create_key_file",
    "load_keyring",
    "rotate_key_file",
    "membership_for",
    "register_membership",
    "EncryptedRecordValidator",
]
