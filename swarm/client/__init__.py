"""The client SDK: routing over the swarm and a Hugging Face-style model."""

from swarm.client.errors import MissingBlocksError, RemoteError
from swarm.client.model import ClientConfig, DistributedModelForCausalLM

__all__ = ["ClientConfig", "DistributedModelForCausalLM", "MissingBlocksError", "RemoteError"]
