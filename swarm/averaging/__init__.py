"""Averaging within a group of peers: hivemind all-reduce wrappers and robust aggregation rules.

Tensors in, tensors out: nothing here knows about models.
"""

from swarm.averaging.group import AveragingOutcome, GroupAverager
from swarm.averaging.reducers import (
    REDUCERS,
    ClipInfo,
    centered_clip,
    get_reducer,
    mean,
    median,
    trimmed_mean,
)

__all__ = [
    "REDUCERS",
    "AveragingOutcome",
    "ClipInfo",
    "GroupAverager",
    "centered_clip",
    "get_reducer",
    "mean",
    "median",
    "trimmed_mean",
]
