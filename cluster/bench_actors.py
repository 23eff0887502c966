"""`pacflow bench actors`: environment steps per second of the acting loop against the raw
simulator, on the same cores in the same run.

ours: what a collector does per wave (cluster/collector.py CollectorWorker): EnvironmentLoop with
      one batched PAC policy call per step for all envs of the actor (a fresh network of the
      preset), then every finished episode validated, archived to Parquet and written to a
      Reverb server in another process (ReverbSequenceAdder, as replay's ingest writes it), on
      the writer thread while the next wave acts (actors/wave_writer.py); a round ends when its
      last wave is written.
raw:  the same environments (same task, action repeat and camera) stepped with uniform random
      actions: no policy, no buffers, no writes, in the actor's process. With env_processes,
      ours steps its own copies of those envs in that many child processes per actor.
Rounds alternate ours and raw; each round is `waves` waves (one episode per env each). With N
actors, N processes run the same side at the same time (a barrier per round) and their steps are
summed. Ratio = ours / raw: 1.0 means the loop costs nothing over the simulator.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np

ENV_REPEAT = {"dm_control:cartpole-swingup": 8, "dm_control:walker-walk": 2}  # demo configs'
PIXELS = (64, 64)  # the camera of the pixel cases


@dataclasses.dataclass(frozen=True)
class ActorCase:
    task: str  # dm_control task
    actors: int  # processes stepping at once
    envs: int  # environments per actor (one batched policy call per step for all)
    preset: str  # model preset of the policy (policies/perceiver.py PRESETS)
    pixels: bool  # observe a 64x64 camera image too
    # ours steps the envs in this many child processes per actor (cluster.env_processes);
    # 0: in the actor, as raw always does
    env_processes: int = 0

    @property
    def name(self) -> str:
        return (f"task={self.task.split(':')[-1]},actors={self.actors},envs={self.envs},"
                f"preset={self.preset},pixels={int(self.pixels)}"
                + (f",env_processes={self.env_processes}" if self.env_processes else ""))


def default_cases(quick: bool = False) -> list[ActorCase]:
    """The issue's grid: 2 tasks x 1|2 actors x 1|4|16 envs x tiny|small x state|pixels; quick:
    cartpole, 1 actor, 1 and 4 envs, tiny, state only."""
    if quick:
        return [ActorCase("dm_control:cartpole-swingup", 1, k, "tiny", False) for k in (1, 4)]
    return [ActorCase(t, a, k, p, px) for t in ENV_REPEAT for a in (1, 2) for k in (1, 4, 16)
            for p in ("tiny", "small") for px in (False, True)]


def select_cases(cases: list[ActorCase], presets: list[str] | None = None,
                 task: str | None = None, observations: list[str] | None = None,
                 actors: list[int] | None = None, envs: list[int] | None = None
                 ) -> list[ActorCase]:
    """The cases of `presets`, `task` and `observations` ("state", "pixels"); with `actors` or
    `envs`, each kept case at those counts instead of its own (any counts, not only the
    grid's), once each. None keeps all."""
    kept = [c for c in cases if (not presets or c.preset in presets)
            and (not task or c.task == task)
            and (not observations or ("pixels" if c.pixels else "state") in observations)]
    return list(dict.fromkeys(dataclasses.replace(c, actors=a, envs=k) for c in kept
                              for a in actors or [c.actors] for k in envs or [c.envs]))


def _side(case: ActorCase, index: int, rounds: int, waves: int, address: str, barrier,
          results) -> None:
    """One actor process: `rounds` x (raw waves, acting waves), each side started together
    with the other actors' (barrier); puts [(side, steps, seconds)] on `results`."""
    import torch

    from actors.env_group import EnvProcesses, LocalEnvs
    from actors.loop import EnvironmentLoop, EpisodeContext
    from actors.wave_writer import WaveWriter
    from cluster.config import EnvConfig
    from policies.perceiver import PRESETS, PerceiverActorCritic, PerceiverConfig
    from policies.policy import PACPolicy
    from replay.adders import ReverbSequenceAdder
    from replay.archive import EpisodeArchive
    from replay.config import ReplayConfig
    from replay.ingest import EpisodeSink

    torch.set_num_threads(1)  # an actor's share, as in the run (cluster/collector.py)
    env_config = EnvConfig((case.task,), ENV_REPEAT[case.task],
                           PIXELS if case.pixels else ())
    spec = env_config.spec()
    env_seeds = [1000 * index + i for i in range(case.envs)]  # each env's initial states
    envs = [env_config.make(case.task, seed) for seed in env_seeds]
    acting = EnvProcesses(env_config.make, [case.task], env_seeds, case.env_processes).group(
        case.task) if case.env_processes else LocalEnvs(envs)
    model = PerceiverActorCritic(spec, PerceiverConfig(**PRESETS[case.preset], v_max=400.0))
    policy = PACPolicy(model, 1, seed=index)
    loop = EnvironmentLoop(acting, spec)
    tmp = tempfile.TemporaryDirectory(prefix="bench-actors-")  # removed when the process ends
    sink = EpisodeSink(spec, EpisodeArchive(Path(tmp.name) / "archive"),
                       ReverbSequenceAdder(address, ReplayConfig(n_step=3)),
                       Path(tmp.name) / "quarantine")
    writer = WaveWriter(lambda episodes: [sink.write(e, to_replay=True) for e in episodes])
    task = spec.tasks[0]
    rng = np.random.default_rng(index)
    out = []
    for r in range(rounds):
        barrier.wait()
        t0, steps = time.perf_counter(), sum(e.num_env_steps for e in envs)
        for w in range(waves):  # raw: the same envs, random actions, nothing kept
            for i, env in enumerate(envs):
                env.seed((r * waves + w) * 100 + i)
                timestep = env.reset()
                while not timestep.last():
                    timestep = env.step(rng.uniform(-1, 1, task.action_dim).astype(np.float32))
        out.append(("raw", sum(e.num_env_steps for e in envs) - steps,
                    time.perf_counter() - t0))
        barrier.wait()
        t0, steps = time.perf_counter(), acting.num_env_steps
        ctx = EpisodeContext("bench", r, f"actor-{index}", case.task, 0, "collect")
        written = []
        for w in range(waves):
            seeds = [(r * waves + w) * 100 + i for i in range(case.envs)]
            written += writer.submit(loop.run(policy, seeds, ctx, False))
        written += writer.finish()
        assert all(all(done.result) for done in written), "an episode was quarantined"
        out.append(("ours", acting.num_env_steps - steps, time.perf_counter() - t0))
    acting.close()
    results.put(out)


def bench_case(case: ActorCase, rounds: int = 3, waves: int = 2) -> dict:
    """Env steps per second of both sides (all actors together), over `rounds` rounds of
    `waves` waves after a warm-up round that is not counted."""
    from cluster.bench_replay import replay_process
    from cluster.config import EnvConfig
    from replay.config import ReplayConfig

    spec = EnvConfig((case.task,), ENV_REPEAT[case.task], PIXELS if case.pixels else ()).spec()
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp, \
            replay_process(spec, ReplayConfig(n_step=3), str(Path(tmp) / "ckpt")) as address:
        barrier, results = ctx.Barrier(case.actors), ctx.Queue()
        procs = [ctx.Process(target=_side, args=(case, i, rounds + 1, waves, address,
                                                        barrier, results))
                 for i in range(case.actors)]
        for p in procs:
            p.start()
        per_actor = [results.get(timeout=3600) for _ in procs]
        for p in procs:
            p.join(60)
    rates, counted = {}, {}
    for side in ("raw", "ours"):
        steps = seconds = 0.0
        for r in range(1, rounds + 1):  # round 0 warms up (imports, first inference)
            rows = [a[2 * r + (side == "ours")] for a in per_actor]
            steps += sum(s for _, s, _ in rows)
            seconds += max(t for _, _, t in rows)  # the actors ran side by side
        rates[side], counted[side] = steps / seconds, int(steps)
    return {"case": case.name, "metric": "env_steps_per_second", "value": rates["ours"],
            "unit": "env steps/s", "baseline": rates["raw"], "ratio": rates["ours"] / rates["raw"],
            "env_steps": counted}


def run_actor_bench(cases: list[ActorCase], rounds: int = 3, json_path: str | None = None,
                    out=print, waves: int = 2) -> dict:
    from cluster.bench import machine

    results = []
    for case in cases:
        results.append(bench_case(case, rounds, waves))
        r = results[-1]
        out(f"{r['case']:<60} {r['value']:>9.0f} {r['baseline']:>9.0f} {r['ratio']:>6.3f}")
    report = {"benchmark": "actors", "machine": machine(), "rounds": rounds, "waves": waves,
              "baseline": "the same environments stepped with random actions, no policy, "
                          "no writes", "results": results}
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
    return report
