"""Placement at scale: every policy on a 1,000-node swarm under two churn traces, for inference spans and
training stages (`swarm.sim`). Writes a JSON summary and one PNG per workload.

    python -m benchmarks.sim_placement [--nodes 1000 --hours 6 --seed 0 \\
        --out benchmarks/results/sim-placement.json --plots docs/]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from swarm.sim.churn import MEAN_LIFETIME_MINUTES, REGION_SHARES, correlated_trace, exponential_trace
from swarm.sim.inference import INFERENCE_POLICIES, run_inference
from swarm.sim.population import GPU_CLASSES, NUM_BLOCKS, SPEED_SPREAD_SIGMA
from swarm.sim.report import PolicyRun
from swarm.sim.training import NUM_STAGES, TRAINING_POLICIES, run_training


def simulate(nodes: int, hours: float, seed: int, log=print) -> tuple[dict, dict[str, list[PolicyRun]]]:
    """Every policy on both traces; the summary and the runs (for the plots)."""
    minutes = round(hours * 60)
    traces = [exponential_trace(nodes, minutes, seed), correlated_trace(nodes, minutes, seed)]
    workloads = {
        "inference": [(name, policy, run_inference) for name, policy in INFERENCE_POLICIES.items()],
        "training": [(name, policy, run_training) for name, policy in TRAINING_POLICIES.items()],
    }
    summary: dict = {
        "nodes": nodes,
        "hours": hours,
        "seed": seed,
        "setup": {
            "blocks": NUM_BLOCKS,
            "training_stages": NUM_STAGES,
            "gpu_classes": [
                {"name": c.name, "share": c.share, "span_blocks": c.span_length, "block_speed": c.block_speed}
                for c in GPU_CLASSES
            ],
            "speed_spread": f"log-normal, sigma {SPEED_SPREAD_SIGMA}",
            "mean_lifetime_minutes": MEAN_LIFETIME_MINUTES,
            "regions": list(REGION_SHARES),
            "outages": {trace.name: trace.outages for trace in traces},
        },
    }
    runs: dict[str, list[PolicyRun]] = {}
    for workload, policies in workloads.items():
        summary[workload] = {}
        runs[workload] = []
        for trace in traces:
            summary[workload][trace.name] = {}
            for name, policy, run_policy in policies:
                started = time.perf_counter()
                run = run_policy(trace, policy, seed)
                row = run.summary() | {"seconds": round(time.perf_counter() - started, 1)}
                summary[workload][trace.name][name] = row
                runs[workload].append(run)
                log(f"{workload} {trace.name} {name}: {row}")
    return summary, runs


def plot(runs: list[PolicyRun], outages: dict[str, list], title: str, path: Path) -> None:
    """One panel per trace, one line per policy; a policy that never moved a node draws no line of its own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace_names = list(dict.fromkeys(run.trace for run in runs))
    figure, axes = plt.subplots(len(trace_names), 1, figsize=(13, 3.4 * len(trace_names)), sharex=True)
    for axis, trace_name in zip(axes, trace_names, strict=True):
        trace_runs = [run for run in runs if run.trace == trace_name]
        for start, end, region in outages.get(trace_name, []):
            axis.axvspan(start / 60, end / 60, color="grey", alpha=0.15, linewidth=0)
            axis.text(start / 60, 1.0, f" region {region} down", fontsize=7, va="top")
        for run in trace_runs:
            mean = sum(run.fractions) / len(run.fractions)
            same_as = next(
                (other.policy for other in trace_runs if other.fractions == run.fractions), run.policy
            )
            if same_as != run.policy:
                axis.plot([], [], label=f"{run.policy}: the same as {same_as} (no move)")
                continue
            hours = [minute / 60 for minute in range(len(run.fractions))]
            label = f"{run.policy} (mean {mean:.3f}, {run.summary()['reloads_per_hour']:g} reloads/h)"
            axis.plot(hours, run.fractions, linewidth=0.8, label=label)
        axis.set_title(f"{trace_name} churn")
        axis.set_ylabel("fraction of optimal")
        axis.set_ylim(top=1.0)
        axis.grid(alpha=0.3)
        axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    axes[-1].set_xlabel("hours")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--hours", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sim-placement.json"))
    parser.add_argument("--plots", type=Path, default=Path("docs"), help="folder for the PNGs ('' for none)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    summary, runs = simulate(args.nodes, args.hours, args.seed)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    if str(args.plots):
        args.plots.mkdir(parents=True, exist_ok=True)
        for workload, workload_runs in runs.items():
            title = f"{workload} placement, {args.nodes} nodes: bottleneck / optimal bound, per minute"
            outages = summary["setup"]["outages"]
            plot(workload_runs, outages, title, args.plots / f"sim-placement-{workload}.png")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
