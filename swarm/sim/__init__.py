"""A placement simulator: a thousand nodes joining and leaving by a churn trace, placed by the very rules the
nodes run (`swarm.node.placement` for inference spans, `swarm.training.balance` for training stages).

Pure Python, no networking, deterministic given a seed. One module per job:

- `population`: the hardware a node brings (GPU class, span length, throughput);
- `churn`: when nodes arrive and leave (exponential lifetimes, and regional outages);
- `inference` and `training`: the swarm's state stepped minute by minute under one policy;
- `petals`: Petals' rebalancing rule, built from our primitives, as the baseline under comparison;
- `report`: fractions of the optimum and reload counts, summarized.

`benchmarks/sim_placement.py` runs every policy on both traces and draws the plots.
"""
