"""Learning curves from `pacflow bench learning` JSON files: a markdown table and one plot.

    python -m cluster.learning_report docs/bench_learning_cartpole.json [...] --out docs/learning

For each task: greedy return vs env steps and vs wall-clock, every seed as a thin line, the IQM
over seeds with its 95% bootstrap interval at the cycles every seed evaluated, and the uniform
random policy (cycle 0 of each seed) as a dashed line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cluster.bench_learning import iqm_with_interval


def evaluated(curve: dict, x_key: str) -> tuple[list[float], list[float]]:
    """The (x, eval_return) points of the cycles that were evaluated."""
    pairs = [(x, y) for x, y in zip(curve[x_key], curve["eval_return"]) if y is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def table(reports: list[dict]) -> str:
    lines = ["| task | seeds | budget | final greedy return per seed | IQM [95% CI] | median | "
             "uniform random | env steps (seed 0) |", "|---|---|---|---|---|---|---|---|"]
    for report in reports:
        runs = report["runs"]
        finals = [r["final_eval_return"] for r in runs]
        iqm, low, high = iqm_with_interval(finals)
        randoms = np.mean([r["random_return"] for r in runs])
        lines.append(
            f"| {report['task'].split(':')[-1]} | {len(runs)} | {report['budget_minutes']:g} min "
            f"| {', '.join(f'{f:.0f}' for f in finals)} | {iqm:.0f} [{low:.0f}, {high:.0f}] "
            f"| {np.median(finals):.0f} | {randoms:.0f} | {runs[0]['curve']['env_steps'][-1]} |")
    return "\n".join(lines) + "\n"


def plot(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 2, figsize=(10, 3.6 * len(reports)), squeeze=False)
    for row, report in zip(axes, reports):
        runs = report["runs"]
        for ax, x_key, label in ((row[0], "env_steps", "env steps"),
                                 (row[1], "seconds", "wall-clock seconds")):
            for run in runs:
                xs, ys = evaluated(run["curve"], x_key)
                ax.plot(xs, ys, "-", lw=0.8, alpha=0.6, label=f"seed {run['seed']}")
            if x_key == "env_steps":  # cycles evaluated by every seed share their env steps
                common = sorted(set.intersection(*(set(evaluated(r["curve"], x_key)[0])
                                                   for r in runs)))
                stats = [iqm_with_interval([dict(zip(*evaluated(r["curve"], x_key)))[x]
                                            for r in runs]) for x in common]
                if stats:
                    ax.plot(common, [s[0] for s in stats], "k-o", lw=2, ms=3, label="IQM")
                    ax.fill_between(common, [s[1] for s in stats], [s[2] for s in stats],
                                    color="k", alpha=0.15, label="95% CI")
            ax.axhline(np.mean([r["random_return"] for r in runs]), color="gray", ls="--",
                       label="uniform random")
            ax.set_xlabel(label)
            ax.set_ylabel("greedy return")
            ax.set_title(report["task"].split(":")[-1])
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cluster.learning_report")
    p.add_argument("json", nargs="+", help="pacflow bench learning --json outputs")
    p.add_argument("--out", required=True, help="path prefix: writes <out>.png and <out>_table.md")
    args = p.parse_args(argv)
    reports = [json.loads(Path(f).read_text()) for f in args.json]
    out = Path(args.out)
    plot(reports, out.with_suffix(".png"))
    Path(f"{out}_table.md").write_text(table(reports))
    print(table(reports))


if __name__ == "__main__":
    main()
