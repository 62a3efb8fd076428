"""Local swarms: bootstrap peer and node processes on this machine, for users, demos and tests."""

from swarm.local.processes import LocalSwarm, ManagedProcess, run_cli, split_blocks

__all__ = ["LocalSwarm", "ManagedProcess", "run_cli", "split_blocks"]
