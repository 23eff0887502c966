"""The offline study of notes/pac.md §8.3: BC, BC+Q and PAC at several alphas on one archive, next
to a plain MLP behaviour-cloning reference trained on the same data for the same updates.

    python -m cluster.sweep --archive ARCHIVE --config deploy/configs/cartpole_offline.yaml \
        --steps 4000 --seeds 0 1 2 --out /tmp/sweep [--below-median] \
        [--variants "MLP BC" BC "PAC a=0.5"]

Each (variant, seed) retrains from scratch for the same number of updates and is evaluated
greedily; results are appended to `<out>.jsonl` as they finish (a stopped sweep keeps what it
has) and summarised in `<out>.md`. `--below-median` keeps only the episodes whose return is
below the archive's median: the low-quality case where BC should fall below the data's mean and
PAC rise above it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cluster.config import ExperimentConfig, load_config
from cluster.offline import evaluate_by_task, parse_where, select_episodes, train_offline
from policies.perceiver import nearest_bins
from replay.archive import EpisodeArchive

MLP_BC = "MLP BC"
VARIANTS = [(MLP_BC, 1.0, 0.0), ("BC", 1.0, 0.0), ("BC+Q", 1.0, 1.0), ("PAC a=0.75", 0.75, 1.0),
            ("PAC a=0.5", 0.5, 1.0), ("PAC a=0.25", 0.25, 1.0), ("PAC a=0", 0.0, 1.0)]


def summarise(results: list[dict]) -> str:
    data = results[0]["data"]
    lines = [f"Dataset: {data['episodes']} collected episodes of `{data['archive']}`"
             f"{' where ' + data['filter'] if data.get('filter') else ''}, mean return "
             f"{data['mean_return']:.1f}, best {data['best_return']:.1f}.", "",
             "| variant | alpha | beta | eval return (mean ± std over seeds) | per seed | seeds |",
             "|---|---|---|---|---|---|"]
    for name, alpha, beta in VARIANTS:
        means = [r["eval_mean"] for r in results if r["variant"] == name]
        if means:
            per_seed = ", ".join(f"{m:.0f}" for m in means)
            lines.append(f"| {name} | {alpha} | {beta} | {np.mean(means):.1f} ± "
                         f"{np.std(means):.1f} | {per_seed} | {len(means)} |")
    return "\n".join(lines) + "\n"


def train_mlp_reference(config: ExperimentConfig, archive_uri: str, where: str | None,
                        steps: int, seed: int) -> dict:
    """The MLP BC reference on exactly the episodes `train_offline` would use."""
    from learners.reference import MLPPolicy, train_mlp_bc

    t0 = time.time()
    archive = EpisodeArchive(archive_uri)
    selection = select_episodes(archive, where)
    episodes = [archive.read(archive.path_of(i)) for i in selection.episode_ids]
    spec = config.env.spec()
    K = config.model.num_action_bins
    obs = np.concatenate([e.observation[:-1] for e in episodes])
    actions = np.concatenate([e.action[:-1] for e in episodes])
    lo, hi = spec.action_min, spec.action_max
    bins = nearest_bins(torch.from_numpy(actions), lo, hi, K).numpy()  # the learner's binning
    model = train_mlp_bc(obs, bins, K, steps, config.learner.batch_size,
                         config.learner.learning_rate, seed)
    policy = MLPPolicy(model, np.linspace(lo, hi, K), seed)
    returns = [r for task_returns in evaluate_by_task(policy, spec, config, seed).values()
               for r in task_returns]
    return {"seed": seed, "alpha": 1.0, "beta": 0.0, "steps": steps,
            "eval_mean": float(np.mean(returns)), "eval_returns": returns,
            "data": {"archive": str(archive_uri), "episodes": len(episodes),
                     "filter": where or "", "mean_return": float(selection.returns.mean()),
                     "best_return": float(selection.returns.max())},
            "learner": {}, "seconds": time.time() - t0}


def below_median_filter(archive_uri: str) -> str:
    """A --where expression selecting the collected episodes below the median return."""
    returns = select_episodes(EpisodeArchive(archive_uri), None).returns
    median = float(np.median(returns))
    parse_where(f"return < {median:.4f}", {"return"})  # well-formed
    return f"return < {median:.4f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cluster.sweep")
    p.add_argument("--archive", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS],
                   choices=[v[0] for v in VARIANTS])
    p.add_argument("--below-median", action="store_true",
                   help="only the episodes below the median return (low-quality data)")
    p.add_argument("--out", required=True, help="path prefix for .jsonl and .md")
    args = p.parse_args(argv)
    out = Path(args.out)
    where = below_median_filter(args.archive) if args.below_median else None
    done = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()] \
        if out.with_suffix(".jsonl").exists() else []
    for seed in args.seeds:
        for name, alpha, beta in VARIANTS:
            if name not in args.variants or \
                    any(r["variant"] == name and r["seed"] == seed for r in done):
                continue
            config = load_config(args.config, [f"learner.alpha={alpha}", f"learner.beta={beta}",
                                               f"loop.eval_episodes={args.eval_episodes}",
                                               f"loop.seed={seed}"])
            if name == MLP_BC:
                result = train_mlp_reference(config, args.archive, where, args.steps, seed)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    result = train_offline(config, args.archive, Path(tmp), args.steps,
                                           where=where, seed=seed, out=lambda line: None)
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
