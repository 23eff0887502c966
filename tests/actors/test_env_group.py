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


def _episodes(envs, seeds, config: EnvConfig = CONFIG, task_id: int = 0):
    spec = config.spec()
    ctx = EpisodeContext("run", 0, "actor-0", config.tasks[task_id], task_id, "collect")
    return EnvironmentLoop(envs, spec).run(RandomPolicy(spec, 11, seed=3), seeds, ctx, False)


def _assert_same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.lineage.seed == y.lineage.seed
        np.testing.assert_array_equal(x.observation, y.observation)
        np.testing.assert_array_equal(x.action, y.action)
        np.testing.assert_array_equal(x.reward, y.reward)


def _processes(make, seeds: list[int], processes: int):
    """(EnvProcesses of TASK alone, its group)"""
    children = EnvProcesses(make, [TASK], seeds, processes)
    return children, children.group(TASK)


def _gone(pids: list[int], timeout: float) -> bool:
    procs = [psutil.Process(p) for p in pids if psutil.pid_exists(p)]
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def _make_failing(task: str, seed: int):
    """EnvConfig.make, but seed 3 has no environment (found by the child by reference)."""
    if seed == 3:
        raise RuntimeError("no environment for seed 3")
    return CONFIG.make(task, seed)


class _Breaks:
    """An env whose 3rd step raises (a simulator error), for the child that steps it."""

    def __init__(self, env):
        self._env, self._steps, self.num_env_steps = env, 0, 0

    def seed(self, seed: int) -> None:
        self._env.seed(seed)

    def reset(self):
        return self._env.reset()

    def step(self, action):
        self._steps += 1
        if self._steps == 3:
            raise FloatingPointError("MuJoCo warning: simulation unstable")
        return self._env.step(action)


def _make_breaking(task: str, seed: int):
    return _Breaks(CONFIG.make(task, seed)) if seed == 3 else CONFIG.make(task, seed)


def test_env_processes_step_as_the_actor_would():
    seeds = [11, 12, 13, 14]  # four envs, two children: the actor steps envs 0 and 3
    local = LocalEnvs([CONFIG.make(TASK, s) for s in seeds])
    group, children = _processes(CONFIG.make, seeds, processes=2)
    pids = group.pids
    try:
        assert len(children) == 4 and len(set(pids)) == 2
        a = _episodes(local, [5, 6, 7, 8, 9])  # two waves: 4 episodes, then 1
        b = _episodes(children, [5, 6, 7, 8, 9])
        assert children.num_env_steps == local.num_env_steps == 5 * 1000
        _assert_same(a, b)
        assert len({e.observation[0].tobytes() for e in b}) == 5  # the seeds took effect
        assert len(a) == len(b) == 5
        # Some envs at a time (the loop steps only those whose episodes go on), in any order.
        local.reset([21, 22, 23, 24])
        children.reset([21, 22, 23, 24])
        for indices in ([3, 1], [0, 2, 3], [2], [1, 0]):
            actions = np.full((len(indices), 1), 0.5, np.float32)
            for x, y in zip(local.step(indices, actions), children.step(indices, actions)):
                np.testing.assert_array_equal(x.observation["position"],
                                              y.observation["position"])
                assert x.reward == y.reward
        assert children.num_env_steps == local.num_env_steps == 5 * 1000 + 8 * 8
    finally:
        children.close()
    assert _gone(pids, 10)


def test_an_actors_tasks_share_its_children():
    """Two tasks, one child: it steps its share of both, each task's episodes as in the actor."""
    config = EnvConfig((TASK, "dm_control:cartpole-balance"), action_repeat=8)
    seeds = [11, 12, 13]
    children = EnvProcesses(config.make, config.tasks, seeds, processes=1)
    pids, steps = children.pids, 0
    try:
        assert len(pids) == 1
        for task_id, task in enumerate(config.tasks):
            local = LocalEnvs([config.make(task, s) for s in seeds])
            group = children.group(task)
            _assert_same(_episodes(local, [5, 6, 7], config, task_id),
                         _episodes(group, [5, 6, 7], config, task_id))
            assert group.num_env_steps == local.num_env_steps == 3 * 1000
            steps += local.num_env_steps
        assert children.num_env_steps() == steps
    finally:
        children.group(TASK).close()  # any task's close ends the children of all
    assert _gone(pids, 10)


def test_a_killed_env_process_fails_the_next_step_and_names_it():
    rng = np.random.default_rng(7)
    kill_at = int(rng.integers(1, 100))  # the step after which the child is killed
    group, envs = _processes(CONFIG.make, [1, 2, 3], processes=2)
    pids = group.pids
    try:
        envs.reset([1, 2, 3])
        actions = np.zeros((3, 1), np.float32)
        for _ in range(kill_at):
            envs.step([0, 1, 2], actions)
        steps = envs.num_env_steps
        psutil.Process(pids[1]).send_signal(signal.SIGKILL)
        with pytest.raises(EnvProcessError, match=rf"env process 1 \(pid {pids[1]}\) exited "
                                                  r"with code -9"):
            envs.step([0, 1, 2], actions)
        assert steps == 3 * 8 * kill_at  # the actor's env and what the children reported
    finally:
        envs.close()
    assert _gone(pids, 10)


def test_an_env_that_fails_ends_the_group_with_one_line_and_no_stale_replies():
    before = set(psutil.Process().children())
    group, envs = _processes(_make_breaking, [1, 2, 3, 4], processes=2)  # env 2: child 1
    pids = group.pids
    try:
        envs.reset([1, 2, 3, 4])
        actions = np.zeros((4, 1), np.float32)
        envs.step([0, 1, 2, 3], actions)
        envs.step([0, 1, 2, 3], actions)
        with pytest.raises(EnvProcessError) as err:
            envs.step([0, 1, 2, 3], actions)
        assert str(err.value) == (f"env process 1 (pid {pids[1]}) failed: FloatingPointError: "
                                  "MuJoCo warning: simulation unstable")
        # Child 0 answered that call too; its reply must not answer the next one: the group
        # is closed instead.
        with pytest.raises(EnvProcessError, match="closed after: env process 1"):
            envs.step([0, 1], actions[:2])
    finally:
        envs.close()
    assert _gone(pids, 10) and set(psutil.Process().children()) == before


def test_an_env_a_child_cannot_build_fails_the_start_naming_the_child():
    before = set(psutil.Process().children())
    with pytest.raises(EnvProcessError, match=r"env process 1 \(pid \d+\) failed: .*"
                                              "no environment for seed 3"):
        _processes(_make_failing, [1, 2, 3], processes=2)  # env 2: child 1
    assert set(psutil.Process().children()) == before  # both children ended and were reaped


def test_processes_must_leave_the_actor_a_share():
    with pytest.raises(ValueError, match="2 env processes for 2 envs: give 1 to 1"):
        _processes(CONFIG.make, [1, 2], processes=2)


def test_children_exit_when_the_actor_is_killed():
    script = textwrap.dedent(f"""
        import sys, time
        from actors.env_group import EnvProcesses
        from cluster.config import EnvConfig
        envs = EnvProcesses(EnvConfig(({TASK!r},), 8).make, [{TASK!r}], [1, 2, 3], processes=2)
        envs.group({TASK!r}).reset([1, 2, 3])
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
