"""Builds a mixed-quality episode archive from the policy snapshots of an online run.

    python -m cluster.mixed_archive --policies runs/<run>/policies --out runs/mixed/archive \
        --config deploy/configs/cartpole_offline.yaml --per-version 12 --random 16 --hold 8

Every stored version acts for `--per-version` episodes (for every other version, or wave of 4
episodes, with random actions mixed in), and `--random` uniformly random episodes are added, so the
returns span poor to good: the learning history of an agent, as in notes/pac.md §8.2. The
environment runs at the config's action repeat (1 for the offline study); a policy trained at action
repeat `--hold` chooses every `--hold` steps and its action is held in between, so it behaves as it
did online while every single step is recorded. Episodes carry their lineage (version = stage, cycle
= version).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from actors.loop import EnvironmentLoop, EpisodeContext
from cluster.config import load_config
from policies.policy import PACPolicy, Policy, RandomPolicy
from policies.snapshot import load_snapshot, snapshot_paths
from replay.archive import EpisodeArchive


class HeldNoisyPolicy:
    """Chooses every `hold` calls (else repeats its last actions); with probability `noise` a
    decision is a uniformly random bin instead of the policy's sample."""

    def __init__(self, policy: Policy, random: RandomPolicy, hold: int, noise: float, seed: int):
        self._policy, self._random, self._hold, self._noise = policy, random, hold, noise
        self.policy_version = policy.policy_version
        self._rng = np.random.default_rng(seed)
        self._calls, self._last = 0, None

    def act(self, observation: np.ndarray, task_id: np.ndarray, greedy: bool,
            pixels: np.ndarray | None = None) -> np.ndarray:
        if self._last is None or self._calls % self._hold == 0 or \
                len(self._last) != len(observation):
            actions = self._policy.act(observation, task_id, greedy, pixels)
            explore = self._rng.random(len(observation)) < self._noise
            if explore.any():
                actions[explore] = self._random.act(observation[explore], task_id[explore], False)
            self._last = actions
        self._calls += 1
        return self._last.copy()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cluster.mixed_archive")
    p.add_argument("--policies", required=True, help="a run's policies/ folder")
    p.add_argument("--out", required=True, help="archive to write")
    p.add_argument("--config", required=True, help="env section: task and action repeat")
    p.add_argument("--per-version", type=int, default=12)
    p.add_argument("--random", type=int, default=16, help="uniformly random episodes")
    p.add_argument("--hold", type=int, default=8, help="steps each policy decision is held")
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.3],
                   help="random-action probabilities, cycled over versions and their waves "
                        "of 4 episodes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    config = load_config(args.config)
    task = config.env.tasks[0]
    spec = config.env.spec()
    archive = EpisodeArchive(args.out)
    envs = [config.env.make(task, args.seed + i) for i in range(4)]
    loop = EnvironmentLoop(envs, spec)
    random = RandomPolicy(spec, config.model.num_action_bins, args.seed)
    next_seed = iter(range(args.seed * 100_000, 10**9))
    stages: list[tuple[int, Policy | None]] = [(0, None)] + [
        (load_snapshot(m).version, PACPolicy.from_snapshot(load_snapshot(m), args.seed))
        for m in snapshot_paths(args.policies)]
    for version, policy in stages:
        count = args.random if policy is None else args.per_version
        returns = []
        for start in range(0, count, len(envs)):
            n = min(len(envs), count - start)
            noise = args.noise[(version + start // len(envs)) % len(args.noise)]
            actor = HeldNoisyPolicy(policy or random, random, args.hold,
                                    0.0 if policy is None else noise, args.seed + start)
            ctx = EpisodeContext(Path(args.out).parent.name, version, f"stage-{version}", task,
                                 0, "collect")
            for episode in loop.run(actor, [next(next_seed) for _ in range(n)], ctx, False):
                archive.write(episode)
                returns.append(episode.episode_return)
        print(f"version {version}: {len(returns)} episodes, return mean {np.mean(returns):.1f} "
              f"(min {np.min(returns):.1f}, max {np.max(returns):.1f})", flush=True)


if __name__ == "__main__":
    main()
