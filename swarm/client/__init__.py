"""The client SDK: routing over the swarm and a Hugging Face-style model."""

from swarm.client.config import ClientConfig
from swarm.client.errors import MissingBlocksError, RemoteError
from swarm.client.model import DistributedModelForCausalLM
from swarm.client.swarm_client import SwarmClient

__all__ = ["ClientConfig", "DistributedModelForCausalLM", "MissingBlocksError", "RemoteError", "SwarmClient"]
