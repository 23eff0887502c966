"""The alpha sweep of notes/pac.md §8.3: BC, BC+Q and PAC at several alphas on one archive.

    python -m cluster.sweep --archive runs/<run>/archive --config deploy/configs/cartpole.yaml \
        --steps 3000 --seeds 0 1 2 --out docs/pac_alpha_sweep

Each (variant, seed) retrains from scratch with `train_offline` for the same number of steps and
is evaluated greedily; results are appended to `<out>.jsonl` as they finish (a stopped sweep
keeps what it has) and summarised in `<out>.md`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from cluster.config import load_config
from cluster.offline import train_offline

VARIANTS = [("BC", 1.0, 0.0), ("BC+Q", 1.0, 1.0), ("PAC a=0.75", 0.75, 1.0),
            ("PAC a=0.5", 0.5, 1.0), ("PAC a=0.25", 0.25, 1.0), ("PAC a=0", 0.0, 1.0)]


def summarise(results: list[dict]) -> str:
    data = results[0]["data"]
    lines = [f"Dataset: {data['episodes']} collected episodes of `{data['archive']}`, mean "
             f"return {data['mean_return']:.1f}, best {data['best_return']:.1f}.", "",
             "| variant | alpha | beta | eval return (mean ± std over seeds) | seeds |",
             "|---|---|---|---|---|"]
    for name, alpha, beta in VARIANTS:
        means = [r["eval_mean"] for r in results if r["variant"] == name]
        if means:
            lines.append(f"| {name} | {alpha} | {beta} | {np.mean(means):.1f} ± "
                         f"{np.std(means):.1f} | {len(means)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cluster.sweep")
    p.add_argument("--archive", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--out", required=True, help="path prefix for .jsonl and .md")
    args = p.parse_args(argv)
    out = Path(args.out)
    done = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()] \
        if out.with_suffix(".jsonl").exists() else []
    for seed in args.seeds:
        for name, alpha, beta in VARIANTS:
            if any(r["variant"] == name and r["seed"] == seed for r in done):
                continue
            config = load_config(args.config, [f"learner.alpha={alpha}", f"learner.beta={beta}",
                                               f"loop.eval_episodes={args.eval_episodes}",
                                               f"loop.seed={seed}"])
            with tempfile.TemporaryDirectory() as tmp:
                result = train_offline(config, args.archive, Path(tmp), args.steps, seed=seed)
            record = {"variant": name, **{k: result[k] for k in (
                "seed", "alpha", "beta", "steps", "eval_mean", "eval_returns", "data",
                "learner", "seconds")}}
            done.append(record)
            with open(out.with_suffix(".jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"{name:12} seed {seed}: eval {result['eval_mean']:.1f} "
                  f"({result['seconds']:.0f}s)", flush=True)
            out.with_suffix(".md").write_text(summarise(done))


if __name__ == "__main__":
    main()
