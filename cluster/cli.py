"""The `pacflow` command line. Bad input ends with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad arguments, config or task: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{self.prog}: {message}")


def _cmd_run(args: argparse.Namespace) -> int:
    from replay.storage import join

    if args.init_from:
        where = args.init_from if "://" in args.init_from else str(Path(args.init_from).absolute())
        args.set = [*(args.set or []), f"learner.init_from={where}"]
    config = load_config_args(args)
    if args.resume and not args.run_dir:
        raise UsageError("--resume needs --run-dir")
    first = config.env.tasks[0].split(":", 1)[-1]  # a task, or a robot spec file's path
    run = args.run_dir or join(config.cluster.storage, time.strftime("%Y%m%d-%H%M%S-") +
                               Path(first).stem)
    if "://" not in run:
        run = str(Path(run).absolute())
        if "runtime_resources" in Path(run).parts or "working_dir_files" in run:
            print(f"warning: run directory {run} is inside Ray's job working dir, which is "
                  "deleted when the cluster stops; pass --run-dir (an absolute path or s3:// "
                  "URI) to keep the run", file=sys.stderr, flush=True)
    from cluster.driver import run_experiment
    from cluster.topology import RunFailed
    from cluster.preflight import RunDirError

    print(f"run directory: {run}", flush=True)
    try:
        run_experiment(config, run, address=args.address, resume=args.resume)
    except RunDirError as e:
        raise UsageError(str(e)) from None
    except RunFailed as e:
        print(f"pacflow run: {e}; continue with --resume --run-dir {run}", file=sys.stderr)
        return 1
    print(f"report: {join(run, 'report', 'returns.png')}", flush=True)
    return 0


def load_config_args(args: argparse.Namespace):
    from actors.envs import UnknownTaskError, parse_task_name
    from actors.robot_spec import RobotSpecError, is_robot_task, robot_spec_of
    from cluster.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.set or [])
        for task in config.env.tasks:
            robot_spec_of(task) if is_robot_task(task) else parse_task_name(task)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    except (UnknownTaskError, RobotSpecError) as e:
        raise UsageError(f"env.tasks: {e}") from None
    return config


def _cmd_train_offline(args: argparse.Namespace) -> int:
    from cluster.offline import FilterError, train_offline
    from replay.archive import ArchiveSchemaError

    config = load_config_args(args)
    steps = args.steps or config.loop.learner_steps_per_cycle * config.loop.num_cycles
    if steps < 1 or args.log_every < 1 or args.eval_every < 0:
        raise UsageError("train-offline: --steps and --log-every must be >= 1, --eval-every >= 0")
    run_dir = Path(args.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S-offline"))
    print(f"run directory: {run_dir.absolute()}", flush=True)
    try:
        result = train_offline(config, args.archive, run_dir.absolute(), steps, args.where,
                               config.loop.seed, stream=args.stream, log_every=args.log_every,
                               eval_every=args.eval_every,
                               out=lambda line: print(line, flush=True))
    except (FilterError, ArchiveSchemaError) as e:
        raise UsageError(str(e)) from None
    data = result["data"]
    evaluated = f"greedy eval return {result['eval_mean']:.1f} over " \
        f"{len(result['eval_returns'])} episodes" if result["eval_mean"] is not None else \
        "not evaluated (robot tasks only)"
    print(f"trained {steps} steps on {data['episodes']} episodes (mean return "
          f"{data['mean_return']:.1f}, best {data['best_return']:.1f}); {evaluated}")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from cluster.services import serve_replay
    from replay.server import ReplayCheckpointError

    config = load_config_args(args)
    try:
        return serve_replay(config, Path(args.dir).absolute(), args.host, args.port,
                            args.checkpoint_period)
    except ReplayCheckpointError as e:
        raise UsageError(str(e)) from None


def _cmd_archive(args: argparse.Namespace) -> int:
    from replay.archive import ArchiveSchemaError, EpisodeArchive

    try:
        archive = EpisodeArchive(args.uri)
    except (ArchiveSchemaError, OSError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    if args.action == "ls":
        for path in archive.paths():
            print(path)
        return 0
    if args.action == "stats":
        return _archive_stats(archive)
    if args.action == "export":
        if not args.destination:
            raise UsageError("archive export needs a destination: archive export URI DEST")
        print(f"exported {archive.export(args.destination)} episodes to {args.destination}")
        return 0
    count, bad = archive.verify()
    print(f"{count} episodes readable in {args.uri}")
    for path, error in bad:
        print(f"unreadable: {path}: {error}")
    return 1 if bad else 0


def _archive_stats(archive) -> int:
    table = archive.episode_table()
    print(f"{table.num_rows} episodes, {sum(table.column('length').to_pylist())} transitions")
    groups = table.group_by(["mode", "cycle", "policy_version", "task"]).aggregate(
        [("episode_id", "count"), ("length", "sum"), ("return", "mean"), ("return", "max")])
    header = f"{'mode':8} {'cycle':>5} {'version':>7} {'episodes':>8} {'steps':>8} " \
             f"{'mean_return':>11} {'best_return':>11}  task"
    print(header)
    for r in sorted(groups.to_pylist(), key=lambda r: (r["mode"], r["cycle"])):
        print(f"{r['mode']:8} {r['cycle']:>5} {r['policy_version']:>7} "
              f"{r['episode_id_count']:>8} {r['length_sum']:>8} {r['return_mean']:>11.1f} "
              f"{r['return_max']:>11.1f}  {r['task']}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from cluster.html_report import write_html_report
    from cluster.report import format_header, format_row, plot_returns, read_rows

    from replay.storage import Storage, StorageError, run_id

    try:
        run = Storage(args.run_dir)
        found = run.exists("cycle.json")
    except (StorageError, OSError, ValueError) as e:
        raise UsageError(f"{args.run_dir}: {str(e).splitlines()[0]}") from None
    if not found:
        raise UsageError(f"{args.run_dir}: no cycle.json (is this a run directory?)")
    rows = read_rows(run.uri)
    print(format_header())
    for row in rows:
        print(format_row(row))
    print(f"report: {plot_returns(rows, run.uri, run_id(run.uri))}")
    print(f"report: {write_html_report(run.uri)}")
    return 0


def _cmd_metrics(args: argparse.Namespace) -> int:
    from cluster.discovery import runs_under, watch_file_sd, write_file_sd

    def runs() -> list[str]:
        return [*args.run, *(r for root in args.under or [] for r in runs_under(root))]

    if not args.run and not args.under:
        raise UsageError("metrics targets: name a run, or --under a folder of runs")
    if args.watch:
        print(f"writing {args.out} every {args.watch:g} s", flush=True)
        watch_file_sd(runs, args.out, args.watch)
        return 0
    print(f"{write_file_sd(runs(), args.out)} targets written to {args.out}", flush=True)
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pacflow", description="Distributed PAC training for robot RL.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run collect-and-infer cycles")
    run.add_argument("--config", required=True,
                     help="YAML config, e.g. deploy/configs/cartpole.yaml")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a config field, e.g. learner.batch_size=512 (repeatable)")
    run.add_argument("--run-dir", help="run storage: a folder or an object-store URI (s3://, "
                     "gs://); default <cluster.storage>/<time>-<task>")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --run-dir (loop.num_cycles may grow)")
    run.add_argument("--address", default=None,
                     help="Ray cluster address ('auto' inside a cluster); default: a local one")
    run.add_argument("--init-from", metavar="SNAPSHOT",
                     help="start from a stored snapshot's weights (its .json, a path or URI) and "
                          "collect cycle 0 with it: sets learner.init_from")
    run.set_defaults(func=_cmd_run)
    offline = sub.add_parser("train-offline", help="retrain PAC from an episode archive")
    offline.add_argument("--archive", required=True, action="append",
                         help="archive path or URI; repeat to train on several (a base policy "
                              "on all archives so far)")
    offline.add_argument("--config", required=True, help="YAML config (env, model, learner)")
    offline.add_argument("--set", action="append", metavar="KEY=VALUE")
    offline.add_argument("--where", help="episode filter, e.g. \"cycle <= 3\"")
    offline.add_argument("--steps", type=int, help="learner steps (default: cycles x steps)")
    offline.add_argument("--stream", action="store_true",
                         help="stream the archive through Ray Data while training (archives "
                              "larger than memory; replay.max_size bounds the table)")
    offline.add_argument("--run-dir", help="output directory (default: runs/<time>-offline)")
    offline.add_argument("--log-every", type=int, default=500, metavar="UPDATES",
                         help="print updates, rate, ETA and losses this often (default 500)")
    offline.add_argument("--eval-every", type=int, default=0, metavar="UPDATES",
                         help="also evaluate greedily this often (loop.eval_episodes episodes "
                              "per task); the curve goes to result.json (default: only at the "
                              "end)")
    offline.set_defaults(func=_cmd_train_offline)
    replay = sub.add_parser("replay", help="run the Reverb replay server on its own")
    replay.add_argument("action", choices=["serve"])
    replay.add_argument("--config", required=True, help="YAML config (env and replay sections)")
    replay.add_argument("--set", action="append", metavar="KEY=VALUE")
    replay.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    replay.add_argument("--host", default="127.0.0.1", help="address to advertise")
    replay.add_argument("--dir", default="replay_checkpoints", help="checkpoint directory")
    replay.add_argument("--checkpoint-period", type=float, default=600.0, metavar="SECONDS")
    replay.set_defaults(func=_cmd_replay)
    archive = sub.add_parser("archive", help="inspect an episode archive")
    archive.add_argument("action", choices=["ls", "stats", "verify", "export"])
    archive.add_argument("uri", help="archive path or URI, e.g. runs/<run>/archive")
    archive.add_argument("destination", nargs="?", help="export: where to write the dataset")
    archive.set_defaults(func=_cmd_archive)
    from cluster.bench_cli import add_bench_command

    add_bench_command(sub)
    from cluster.fleet import add_fleet_commands

    add_fleet_commands(sub)
    metrics = sub.add_parser("metrics", help="Prometheus file_sd targets of runs in any storage")
    metrics.add_argument("action", choices=["targets"])
    metrics.add_argument("run", nargs="*", help="run directories or storage URIs")
    metrics.add_argument("--under", action="append", metavar="ROOT",
                         help="every run under this folder or URI, e.g. s3://bucket/runs "
                              "(listed again each round)")
    metrics.add_argument("--out", required=True, help="the file_sd JSON file to write")
    metrics.add_argument("--watch", type=float, metavar="SECONDS",
                         help="rewrite it this often until stopped (a Prometheus sidecar)")
    metrics.set_defaults(func=_cmd_metrics)
    report = sub.add_parser("report", help="print a run's cycle table, redraw its plot, "
                            "write report/index.html")
    report.add_argument("run_dir")
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = make_parser().parse_args(argv)
        return args.func(args)
    except UsageError as e:
        print(f"pacflow: error: {e}" if not str(e).startswith("pacflow") else f"{e}",
              file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("pacflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # through the package module, so there is one UsageError class
    from cluster.cli import main as package_main

    sys.exit(package_main())
