"""SWARM-parallel training: run files, stage trainers and the clients that feed them."""
