"""An actor's environments as one group per task the acting loop steps together: in the actor's
own process (`LocalEnvs`), or spread over child processes that step their shares in parallel
(`EnvProcesses`, cluster.env_processes), so an actor given several CPUs uses them. An actor's
tasks share its children: each child steps its share of every task's envs.

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
from typing import TYPE_CHECKING, Callable, Hashable, Mapping, Sequence

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
    in the order asked. A group answers (env index, seed or action) requests in `_call`."""

    def __len__(self) -> int:
        raise NotImplementedError

    def _call(self, kind: str, requests: Sequence[tuple[int, object]]) -> list[dm_env.TimeStep]:
        raise NotImplementedError

    def reset(self, seeds: Sequence[int]) -> list[dm_env.TimeStep]:
        return self._call("reset", list(enumerate(seeds)))

    def step(self, indices: Sequence[int], actions: Sequence[np.ndarray]
             ) -> list[dm_env.TimeStep]:
        return self._call("step", list(zip(indices, actions)))

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

    def _call(self, kind: str, requests: Sequence[tuple[int, object]]) -> list[dm_env.TimeStep]:
        return _answer(self.envs, kind, requests)

    @property
    def num_env_steps(self) -> int:
        return sum(env.num_env_steps for env in self.envs)


def _reset(env: "SeededEnvironment", seed: int) -> dm_env.TimeStep:
    env.seed(seed)
    return env.reset()


class EnvProcesses:
    """Every task's envs, `make(task, seeds[i])` for env i of each task, dealt round-robin over
    this process and `processes` children: env i is stepped here when i % (processes + 1) == 0,
    else by child i % (processes + 1) - 1, whatever its task. `group(task)` is a task's
    EnvGroup. A call sends every child its share, steps this process's share meanwhile, then
    collects the children's replies: all of them step in parallel, and the actor's own core
    is not idle while its children step. A failed call closes the children for every task.

    Usage:
        envs = EnvProcesses(env_config.make, ["dm_control:walker-walk"], [1, 2, 3, 4], 1)
        walker = envs.group("dm_control:walker-walk")
        timesteps = walker.reset([10, 11, 12, 13])
        timesteps = walker.step([0, 2], [action0, action2])
        envs.close()
    """

    def __init__(self, make: MakeEnv, tasks: Sequence[str], seeds: Sequence[int],
                 processes: int):
        if not 1 <= processes < len(seeds):
            raise ValueError(f"{processes} env processes for {len(seeds)} envs: give 1 to "
                             f"{len(seeds) - 1} (this process steps a share too)")
        self._size, shares = len(seeds), processes + 1
        self._steps: list[dict[str, int]] = [{} for _ in range(processes)]  # per child, task
        self._failed = ""  # why the children were closed by a failed call
        self._children: list[tuple[subprocess.Popen, Connection]] = []
        self._local = {(t, i): make(t, seed) for t in tasks
                       for i, seed in enumerate(seeds) if i % shares == 0}
        try:
            for p in range(1, shares):
                mine = [(i, seed) for i, seed in enumerate(seeds) if i % shares == p]
                self._children.append(_spawn(make, list(tasks), mine))
            self._gather(range(processes))  # each child has built its envs (or failed)
        except BaseException:
            self.close()
            raise
        self._groups = {t: _TaskEnvs(self, t) for t in tasks}

    def group(self, task: str) -> EnvGroup:
        """The envs of `task`."""
        return self._groups[task]

    def _gather(self, children: Sequence[int]) -> list:
        """The replies of `children`, in that order (each child's: a list, one per env asked)."""
        replies = []
        for p in children:
            process, conn = self._children[p]
            try:
                kind, body, steps = conn.recv()
            except (EOFError, OSError):
                try:
                    code = process.wait(CLOSE_SECONDS)
                except subprocess.TimeoutExpired:  # its socket closed, yet it lives on
                    code = "none (still running)"
                raise EnvProcessError(f"env process {p} (pid {process.pid}) exited with code "
                                      f"{code} (negative: killed by that signal)") from None
            if kind == "error":
                raise EnvProcessError(f"env process {p} (pid {process.pid}) failed: {body}")
            self._steps[p] = steps
            replies.append(body)
        return replies

    def call(self, task: str, kind: str, requests: Sequence[tuple[int, object]]
             ) -> list[dm_env.TimeStep]:
        """Sends each (env index, argument) of `task` to its child, answers this process's
        share, then returns the TimeSteps in order. Any failure ends the group (its children
        are closed): replies left unread would otherwise answer the next call."""
        if self._failed:
            raise EnvProcessError(f"the env processes were closed after: {self._failed}")
        try:
            return self._exchange(task, kind, requests)
        except BaseException as e:
            self._failed = str(e) or type(e).__name__
            self.close()
            raise

    def _exchange(self, task: str, kind: str, requests: Sequence[tuple[int, object]]
                  ) -> list[dm_env.TimeStep]:
        shares = len(self._children) + 1
        share: dict[int, list] = {}
        for i, argument in requests:
            share.setdefault(i % shares, []).append(((task, i), argument))
        children = [p - 1 for p in share if p > 0]
        for p in children:
            try:
                self._children[p][1].send((kind, share[p + 1]))
            except OSError:  # the child has gone: _gather says how
                pass
        out = dict(zip((key for key, _ in share.get(0, [])),
                       _answer(self._local, kind, share.get(0, []))))
        for p, reply in zip(children, self._gather(children)):
            out.update(zip((key for key, _ in share[p + 1]), reply))
        return [out[task, i] for i, _ in requests]

    def num_env_steps(self, task: str | None = None) -> int:
        """Underlying environment steps taken so far by `task`'s envs (None: every task's)."""
        return sum(n for steps in self._steps for t, n in steps.items()
                   if task in (None, t)) + \
            sum(env.num_env_steps for (t, _), env in self._local.items() if task in (None, t))

    @property
    def size(self) -> int:
        """Envs per task."""
        return self._size

    @property
    def pids(self) -> list[int]:
        """The children's process ids: child p steps envs p + 1, p + 1 + (processes + 1), ..."""
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


class _TaskEnvs(EnvGroup):
    """One task's envs in EnvProcesses (which its close() closes, for every task)."""

    def __init__(self, processes: EnvProcesses, task: str):
        self._processes, self._task = processes, task

    def __len__(self) -> int:
        return self._processes.size

    def _call(self, kind: str, requests: Sequence[tuple[int, object]]) -> list[dm_env.TimeStep]:
        return self._processes.call(self._task, kind, requests)

    @property
    def num_env_steps(self) -> int:
        return self._processes.num_env_steps(self._task)

    def close(self) -> None:
        self._processes.close()


def _answer(envs: Mapping[Hashable, "SeededEnvironment"] | Sequence["SeededEnvironment"],
            kind: str, items: Sequence[tuple[Hashable, object]]) -> list[dm_env.TimeStep]:
    """A "reset" (env key, seed) or "step" (env key, action) request's TimeSteps: keys index
    `envs` (positions in a list, (task, index) in a child)."""
    if kind == "reset":
        return [_reset(envs[i], seed) for i, seed in items]
    return [envs[i].step(action) for i, action in items]


def _spawn(make: MakeEnv, tasks: list[str], envs: list[tuple[int, int]]
           ) -> tuple[subprocess.Popen, Connection]:
    ours, theirs = socket.socketpair()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    with theirs:
        process = subprocess.Popen([sys.executable, "-m", "actors.env_group",
                                    str(theirs.fileno())], pass_fds=[theirs.fileno()], env=env)
    conn = Connection(ours.detach())
    conn.send((make, tasks, envs))
    return process, conn


def _failure(e: Exception) -> str:
    """One line for the parent's error; the traceback goes to this child's stderr (the actor's
    log)."""
    traceback.print_exc()
    return f"{type(e).__name__}: {e}".splitlines()[0]


def serve(conn: Connection) -> None:
    """A child's loop: builds its envs (env i of each task), then answers reset and step
    requests until the parent closes the connection. Replies carry the env steps taken so far
    per task."""
    try:
        make, tasks, seeds = conn.recv()
        envs = {(t, i): make(t, seed) for t in tasks for i, seed in seeds}
    except Exception as e:
        conn.send(("error", _failure(e), {}))
        return
    conn.send(("ready", [], {}))
    while True:
        try:
            kind, items = conn.recv()
        except (EOFError, OSError):  # the parent closed its end, or is gone
            return
        try:
            body = _answer(envs, kind, items)
        except Exception as e:
            conn.send(("error", _failure(e), {}))
            continue
        steps: dict[str, int] = {}
        for (t, _), env in envs.items():
            steps[t] = steps.get(t, 0) + env.num_env_steps
        conn.send(("ok", body, steps))


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
