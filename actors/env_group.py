"""An actor's environments as one group the acting loop steps together: in the actor's own
process (`LocalEnvs`), or spread over child processes that step their shares in parallel
(`EnvProcesses`, cluster.env_processes), so an actor given several CPUs uses them.

Each child is `python -m actors.env_group` on one end of a socket pair; requests and replies
are pickled (multiprocessing's Connection). A child that loses its parent (the connection
closes) exits; a child that dies makes the next call raise `EnvProcessError`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Callable, Sequence

import dm_env
import numpy as np

if TYPE_CHECKING:
    from actors.envs import SeededEnvironment

# (task, seed) -> a new environment; picklable, as it is sent to each child (a run passes
# `EnvConfig.make`, a bound method of a frozen dataclass)
MakeEnv = Callable[[str, int], "SeededEnvironment"]

CLOSE_SECONDS = 10.0  # a child that has not exited this long after close() is killed


class EnvProcessError(RuntimeError):
    """A child process stepping environments died or failed; the message names it."""


class EnvGroup:
    """K environments of one task. `reset(seeds)` seeds and resets the first len(seeds) of them;
    `step(indices, actions)` steps those envs with those actions; both return their TimeSteps
    in the order asked."""

    def __len__(self) -> int:
        raise NotImplementedError

    def reset(self, seeds: Sequence[int]) -> list[dm_env.TimeStep]:
        raise NotImplementedError

    def step(self, indices: Sequence[int], actions: Sequence[np.ndarray]
             ) -> list[dm_env.TimeStep]:
        raise NotImplementedError

    @property
    def num_env_steps(self) -> int:
        """Underlying environment steps taken so far, all envs together."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalEnvs(EnvGroup):
    """Environments stepped one after another by the calling thread."""

    def __init__(self, envs: Sequence["SeededEnvironment"]):
        self.envs = list(envs)

    def __len__(self) -> int:
        return len(self.envs)

    def reset(self, seeds: Sequence[int]) -> list[dm_env.TimeStep]:
        return [_reset(env, seed) for env, seed in zip(self.envs, seeds)]

    def step(self, indices: Sequence[int], actions: Sequence[np.ndarray]
             ) -> list[dm_env.TimeStep]:
        return [self.envs[i].step(a) for i, a in zip(indices, actions)]

    @property
    def num_env_steps(self) -> int:
        return sum(env.num_env_steps for env in self.envs)


def _reset(env: "SeededEnvironment", seed: int) -> dm_env.TimeStep:
    env.seed(seed)
    return env.reset()


class EnvProcesses(EnvGroup):
    """Env i, `make(task, seeds[i])`, lives in child process i % `processes`; a call sends
    every child its share, then collects the replies, so the children step in parallel.

    Usage:
        envs = EnvProcesses(env_config.make, "dm_control:walker-walk", [1, 2, 3, 4], processes=2)
        timesteps = envs.reset([10, 11, 12, 13])
        timesteps = envs.step([0, 2], [action0, action2])
        envs.close()
    """

    def __init__(self, make: MakeEnv, task: str, seeds: Sequence[int], processes: int):
        if not 1 <= processes <= len(seeds):
            raise ValueError(f"{processes} env processes for {len(seeds)} envs: give 1 to "
                             f"{len(seeds)}")
        self._size, self._steps = len(seeds), [0] * processes
        self._children: list[tuple[subprocess.Popen, Connection]] = []
        try:
            for p in range(processes):
                mine = [(i, seed) for i, seed in enumerate(seeds) if i % processes == p]
                self._children.append(_spawn(make, task, mine))
            self._gather(range(processes))  # each child has built its envs (or failed)
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return self._size

    def _gather(self, children: Sequence[int]) -> list:
        """The replies of `children`, in that order (each child's: a list, one per env asked)."""
        replies = []
        for p in children:
            process, conn = self._children[p]
            try:
                kind, body, steps = conn.recv()
            except (EOFError, OSError):
                code = process.wait()
                raise EnvProcessError(f"env process {p} (pid {process.pid}) exited with code "
                                      f"{code} (negative: killed by that signal)") from None
            if kind == "error":
                raise EnvProcessError(f"env process {p} (pid {process.pid}) failed: {body}")
            self._steps[p] = steps
            replies.append(body)
        return replies

    def _call(self, kind: str, requests: Sequence[tuple[int, object]]) -> list[dm_env.TimeStep]:
        """Sends each (env index, argument) to its child, then returns the TimeSteps in order."""
        n = len(self._children)
        share: dict[int, list] = {}
        for i, argument in requests:
            share.setdefault(i % n, []).append((i, argument))
        for p, items in share.items():
            try:
                self._children[p][1].send((kind, items))
            except OSError:  # the child has gone: _gather says how
                pass
        replies = dict(zip(share, self._gather(list(share))))
        out = {}
        for p, items in share.items():
            out.update(zip((i for i, _ in items), replies[p]))
        return [out[i] for i, _ in requests]

    def reset(self, seeds: Sequence[int]) -> list[dm_env.TimeStep]:
        return self._call("reset", list(enumerate(seeds)))

    def step(self, indices: Sequence[int], actions: Sequence[np.ndarray]
             ) -> list[dm_env.TimeStep]:
        return self._call("step", list(zip(indices, actions)))

    @property
    def num_env_steps(self) -> int:
        return sum(self._steps)

    @property
    def pids(self) -> list[int]:
        """The children's process ids, child p stepping envs p, p + processes, ..."""
        return [process.pid for process, _ in self._children]

    def close(self) -> None:
        for _, conn in self._children:
            conn.close()  # the child reads the end of its input and exits
        for process, _ in self._children:
            try:
                process.wait(CLOSE_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._children = []


def _spawn(make: MakeEnv, task: str, envs: list[tuple[int, int]]
           ) -> tuple[subprocess.Popen, Connection]:
    ours, theirs = socket.socketpair()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    with theirs:
        process = subprocess.Popen([sys.executable, "-m", "actors.env_group",
                                    str(theirs.fileno())], pass_fds=[theirs.fileno()], env=env)
    conn = Connection(ours.detach())
    conn.send((make, task, envs))
    return process, conn


def serve(conn: Connection) -> None:
    """A child's loop: builds its envs, then answers reset and step requests until the parent
    closes the connection."""
    try:
        make, task, seeds = conn.recv()
        envs = {i: make(task, seed) for i, seed in seeds}
    except Exception:
        conn.send(("error", traceback.format_exc(limit=3), 0))
        return
    conn.send(("ready", [], 0))
    while True:
        try:
            kind, items = conn.recv()
        except EOFError:
            return
        try:
            if kind == "reset":
                body = [_reset(envs[i], seed) for i, seed in items]
            else:
                body = [envs[i].step(action) for i, action in items]
        except Exception:
            conn.send(("error", traceback.format_exc(limit=3), 0))
            continue
        conn.send(("ok", body, sum(e.num_env_steps for e in envs.values())))


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
