"""An actor's environments stepped in child processes (actors/env_group.py), against the same
environments stepped in the actor."""

import signal
import subprocess
import sys
import textwrap

import numpy as np
import psutil
import pytest

from actors.env_group import EnvProcesses, EnvProcessError, LocalEnvs
from actors.loop import EnvironmentLoop, EpisodeContext
from cluster.config import EnvConfig
from policies.policy import RandomPolicy

TASK = "dm_control:cartpole-swingup"
CONFIG = EnvConfig((TASK,), action_repeat=8)


def _episodes(envs, seeds):
    spec = CONFIG.spec()
    ctx = EpisodeContext("run", 0, "actor-0", TASK, 0, "collect")
    return EnvironmentLoop(envs, spec).run(RandomPolicy(spec, 11, seed=3), seeds, ctx, False)


def _gone(pids: list[int], timeout: float) -> bool:
    procs = [psutil.Process(p) for p in pids if psutil.pid_exists(p)]
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_env_processes_step_as_the_actor_would():
    seeds = [11, 12, 13]  # three envs, two processes: one child steps two of them
    local = LocalEnvs([CONFIG.make(TASK, s) for s in seeds])
    children = EnvProcesses(CONFIG.make, TASK, seeds, processes=2)
    pids = children.pids
    try:
        assert len(children) == 3 and len(set(pids)) == 2
        a = _episodes(local, [5, 6, 7, 8])  # two waves: 3 episodes, then 1
        b = _episodes(children, [5, 6, 7, 8])
        assert children.num_env_steps == local.num_env_steps == 4 * 1000
        for x, y in zip(a, b):
            assert x.lineage.seed == y.lineage.seed
            np.testing.assert_array_equal(x.observation, y.observation)
            np.testing.assert_array_equal(x.action, y.action)
            np.testing.assert_array_equal(x.reward, y.reward)
        assert len({e.observation[0].tobytes() for e in b}) == 4  # the seeds took effect
    finally:
        children.close()
    assert _gone(pids, 10)


def test_a_killed_env_process_fails_the_next_step_and_names_it():
    rng = np.random.default_rng(7)
    kill_at = int(rng.integers(1, 100))  # the step after which the child is killed
    envs = EnvProcesses(CONFIG.make, TASK, [1, 2], processes=2)
    pids = envs.pids
    try:
        envs.reset([1, 2])
        actions = np.zeros((2, 1), np.float32)
        for _ in range(kill_at):
            envs.step([0, 1], actions)
        steps = envs.num_env_steps
        psutil.Process(pids[1]).send_signal(signal.SIGKILL)
        with pytest.raises(EnvProcessError, match=rf"env process 1 \(pid {pids[1]}\) exited "
                                                  r"with code -9"):
            envs.step([0, 1], actions)
        assert steps == 2 * 8 * kill_at  # what the children reported before
    finally:
        envs.close()
    assert _gone(pids, 10)


def test_an_env_that_cannot_be_built_fails_the_start():
    bad = EnvConfig(("dm_control:cartpole-flip",))  # no such task: make() refuses it
    before = set(psutil.Process().children())
    with pytest.raises(EnvProcessError, match="unknown task 'dm_control:cartpole-flip'"):
        EnvProcesses(bad.make, "dm_control:cartpole-flip", [1, 2], processes=2)
    started = [p.pid for p in set(psutil.Process().children()) - before]
    assert _gone(started, 10)


def test_processes_must_fit_the_envs():
    with pytest.raises(ValueError, match="3 env processes for 2 envs"):
        EnvProcesses(CONFIG.make, TASK, [1, 2], processes=3)


def test_children_exit_when_the_actor_is_killed():
    script = textwrap.dedent(f"""
        import sys, time
        from actors.env_group import EnvProcesses
        from cluster.config import EnvConfig
        envs = EnvProcesses(EnvConfig(({TASK!r},), 8).make, {TASK!r}, [1, 2], processes=2)
        envs.reset([1, 2])
        print(*envs.pids, flush=True)
        time.sleep(600)
    """)
    actor = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in actor.stdout.readline().split()]
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
        actor.send_signal(signal.SIGKILL)
        actor.wait()
        assert _gone(pids, 15), "env processes outlived their actor"
    finally:
        actor.kill()
