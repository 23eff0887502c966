"""`pacflow bench ...`: throughput and learning benchmarks, each against a baseline measured in
the same run. Bad input raises UsageError (one line, exit code 2)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cluster.cli import UsageError


def _cmd_bench(args: argparse.Namespace) -> int:
    from cluster.bench import format_report

    if args.target == "replay":
        from cluster.bench_replay import run_replay_bench

        print(format_report(run_replay_bench(args.json)))
        return 0
    if args.target == "learning":
        return _bench_learning(args)
    if args.target == "actors":
        return _bench_actors(args)
    if args.target == "samplers":
        from cluster.bench_samplers import run_sampler_bench

        counts = tuple(args.samplers or (1, 2, 4))
        if min(counts) < 1:
            raise UsageError("--samplers must be >= 1")
        print(format_report(run_sampler_bench(counts, args.batch_size or 1024,
                                              json_path=args.json)))
        return 0
    if args.target == "policy-push":
        from cluster.bench_push import run_push_bench

        print(format_report(run_push_bench(args.json)))
        return 0
    from cluster.bench import run_learner_bench
    from policies.perceiver import PRESETS

    args.preset = args.preset or ["tiny"]
    for preset in args.preset:
        if preset not in PRESETS:
            raise UsageError(f"--preset: {preset!r} is not one of {', '.join(PRESETS)}")
    if args.threads and min(args.threads) < 1:
        raise UsageError("--threads must be >= 1")
    report = run_learner_bench(args.preset, args.steps, args.batch_size or 128, args.device,
                               args.json, args.threads)
    print(format_report(report))
    return 0


def _bench_actors(args: argparse.Namespace) -> int:
    import dataclasses

    from cluster.bench import format_report
    from cluster.bench_actors import ENV_REPEAT, default_cases, run_actor_bench, select_cases
    from policies.perceiver import PRESETS

    cases = default_cases(quick=args.quick)
    for preset in args.preset or []:
        if preset not in PRESETS:
            raise UsageError(f"--preset: {preset!r} is not one of {', '.join(PRESETS)}")
    if args.task and args.task not in ENV_REPEAT:
        raise UsageError(f"--task: actors benchmarks {', '.join(ENV_REPEAT)}, not {args.task!r}")
    for flag, values in (("--actors", args.actors), ("--envs", args.envs)):
        if any(v < 1 for v in values or []):
            raise UsageError(f"{flag} must be >= 1")
    cases = select_cases(cases, args.preset, args.task, args.observations, args.actors,
                         args.envs)
    if args.env_processes:
        if args.env_processes < 0 or any(args.env_processes >= c.envs for c in cases):
            raise UsageError(f"--env-processes {args.env_processes}: give 0 to one less than "
                             f"the fewest --envs of the cases ({min(c.envs for c in cases)})")
        cases = [dataclasses.replace(c, env_processes=args.env_processes) for c in cases]
    if args.rounds < 1 or args.waves < 1:
        raise UsageError("--rounds and --waves must be >= 1")
    print(format_report(run_actor_bench(cases, args.rounds, args.json, waves=args.waves)))
    return 0


def _bench_learning(args: argparse.Namespace) -> int:
    from actors.envs import UnknownTaskError, parse_task_name
    from cluster.bench import format_report
    from cluster.bench_learning import run_learning_bench
    from cluster.config import ConfigError
    from cluster.preflight import RunDirError

    if not args.task:
        raise UsageError("bench learning needs --task, e.g. dm_control:cartpole-swingup")
    if args.budget_minutes <= 0 or args.seeds < 1:
        raise UsageError("bench learning: --budget-minutes must be > 0 and --seeds >= 1")
    try:
        parse_task_name(args.task)
        out = Path(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S-bench-learning"))
        report = run_learning_bench(args.task, args.budget_minutes, args.seeds, out, args.json,
                                    args.config, log=lambda line: print(line, flush=True))
    except UnknownTaskError as e:
        raise UsageError(f"--task: {e}") from None
    except (ConfigError, RunDirError) as e:
        raise UsageError(str(e)) from None
    print(format_report(report))
    return 0


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    """Adds `bench` to the `pacflow` subcommands."""
    bench = sub.add_parser("bench", help="measure throughput against a same-run baseline")
    bench.add_argument("target", choices=["learner", "replay", "policy-push", "learning",
                                          "actors", "samplers"])
    bench.add_argument("--preset", action="append", default=None,
                       help="model preset: tiny, small, base, large (repeatable; default tiny)")
    bench.add_argument("--steps", type=int, default=30, help="timed updates per case")
    bench.add_argument("--batch-size", type=int, default=None,
                       help="learner: default 128; samplers: default 1024")
    bench.add_argument("--samplers", type=int, action="append", default=None,
                       help="samplers: sampling processes at once (repeatable; default 1 2 4)")
    bench.add_argument("--threads", type=int, action="append", default=None,
                       help="learner: torch CPU threads to measure (repeatable; default the "
                            "config's, 2)")
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    bench.add_argument("--json", help="write the results here")
    bench.add_argument("--quick", action="store_true",
                       help="actors: cartpole, 1 actor, 1 and 4 envs, tiny, state only")
    bench.add_argument("--actors", type=int, action="append", default=None,
                       help="actors: actor processes (repeatable; default 1 2)")
    bench.add_argument("--envs", type=int, action="append", default=None,
                       help="actors: environments per actor (repeatable; default 1 4 16)")
    bench.add_argument("--env-processes", type=int, default=0,
                       help="actors: step each actor's envs in the actor and this many child "
                            "processes (cluster.env_processes; default 0: in the actor)")
    bench.add_argument("--observations", action="append", choices=["state", "pixels"],
                       default=None, help="actors: state, pixels (repeatable; default both)")
    bench.add_argument("--rounds", type=int, default=3,
                       help="actors: timed rounds per case, after one warm-up")
    bench.add_argument("--waves", type=int, default=2,
                       help="actors: waves (one episode per env) per round; a wave is written "
                            "while the next acts, and a round ends when its last is written")
    bench.add_argument("--task", help="learning: the task, e.g. dm_control:cartpole-swingup")
    bench.add_argument("--budget-minutes", type=float, default=10.0,
                       help="learning: wall-clock budget of each seed's run (default 10)")
    bench.add_argument("--seeds", type=int, default=3, help="learning: seeds 0..S-1 (default 3)")
    bench.add_argument("--config", help="learning: base config (default: the task's tuned one "
                                        "in deploy/configs, else cartpole.yaml)")
    bench.add_argument("--out", help="learning: where the runs go (default runs/<time>-bench-...)")
    bench.set_defaults(func=_cmd_bench)
