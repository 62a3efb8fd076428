"""swarm: run and train large language models on a decentralized peer-to-peer swarm."""

__version__ = "0.1.0"
