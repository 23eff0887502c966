"""MuJoCo stand-ins for real robots: dm_env environments for `pacflow robot --env MODULE:FACTORY`.

A factory takes no required arguments and returns a dm_env.Environment whose observations are
the named arrays of a task in the policy's env spec. Real robots provide their own factory with the
same contract (and may define `hold(action)` to command a safe idle between episodes).
"""

from __future__ import annotations

import os

from actors.envs import SeededEnvironment, make_environment


def cartpole(seed: int | None = None, time_limit: float | None = None) -> SeededEnvironment:
    """dm_control cartpole-swingup with the demo's action repeat of 8.

    PACFLOW_STANDIN_TIME_LIMIT (simulated seconds) shortens episodes, e.g. for tests."""
    if time_limit is None and os.environ.get("PACFLOW_STANDIN_TIME_LIMIT"):
        time_limit = float(os.environ["PACFLOW_STANDIN_TIME_LIMIT"])
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    return make_environment("dm_control:cartpole-swingup", seed, action_repeat=8,
                            time_limit=time_limit)
