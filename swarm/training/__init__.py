"""SWARM-parallel training: run files, training nodes' stages, trainers, export.

`SwarmTrainer` is imported on first use, so that `swarm.training.run` (read by the CLI) stays light.
"""

from __future__ import annotations

__all__ = ["SwarmTrainer", "TrainStep"]


def __getattr__(name: str):
    if name in __all__:
        from swarm.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
