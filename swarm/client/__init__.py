"""The client SDK: routing over the swarm and a Hugging Face-style model."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swarm.client.config import ClientConfig
    from swarm.client.errors import MissingBlocksError, RemoteError
    from swarm.client.model import DistributedModelForCausalLM
    from swarm.client.swarm_client import SwarmClient

# imported on first use: the CLI reads `swarm.client.config` for its flags, and `swarm --help` or a usage
# error should not wait for torch and transformers
_EXPORTS = {
    "ClientConfig": "swarm.client.config",
    "DistributedModelForCausalLM": "swarm.client.model",
    "MissingBlocksError": "swarm.client.errors",
    "RemoteError": "swarm.client.errors",
    "SwarmClient": "swarm.client.swarm_client",
}

__all__ = ["ClientConfig", "DistributedModelForCausalLM", "MissingBlocksError", "RemoteError", "SwarmClient"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'swarm.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
