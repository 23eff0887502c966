"""`pacflow robot` and `pacflow policy serve|ls|pin|unpin|gen-certs`: the commands that face
robots and operators. Bad input raises UsageError (one line, exit code 2)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import socket
from pathlib import Path
from typing import Callable

from cluster.cli import UsageError, load_config_args
from cluster.shutdown import ShutdownSignals, watch_signals
from policies.security import ClientSecurity, SecurityError, ServerSecurity, is_loopback


def add_credential_flags(parser: argparse.ArgumentParser, identity_help: str) -> None:
    parser.add_argument("--credentials", metavar="DIR",
                        help="a `pacflow policy gen-certs` directory (CA, certificate, token)")
    parser.add_argument("--identity", help=identity_help)
    parser.add_argument("--ca", help="CA certificate of the server (PEM)")
    parser.add_argument("--cert", help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--key", help="client private key (PEM)")
    parser.add_argument("--token-file", help="file holding the bearer token")
    parser.add_argument("--server-name", default="",
                        help="name to check in the server certificate (default: its host)")


def client_security(args: argparse.Namespace, address: str, identity: str) -> ClientSecurity:
    """The credentials the flags name; plaintext only towards a loopback server."""
    if args.credentials:
        security = ClientSecurity.from_dir(args.credentials, identity)
        security = ClientSecurity(args.ca or security.ca_file, args.cert or security.cert_file,
                                  args.key or security.key_file,
                                  args.token_file or security.token_file, args.server_name)
    else:
        security = ClientSecurity(args.ca or "", args.cert or "", args.key or "",
                                  args.token_file or "", args.server_name)
    for path in (security.ca_file, security.cert_file, security.key_file, security.token_file):
        if path and not Path(path).is_file():
            raise UsageError(f"--credentials: {path} does not exist")
    host = address.rsplit(":", 1)[0]
    if not security.ca_file and not is_loopback(host):
        raise UsageError(f"{address}: plaintext is only for loopback servers; give "
                         "--credentials DIR or --ca")
    return security


def load_env_factory(spec: str) -> Callable:
    """`module:factory` -> the factory, or UsageError naming what is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--env {spec!r}: expected MODULE:FACTORY, e.g. actors.standins:cartpole")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module failing as it loads
        raise UsageError(f"--env {spec!r}: cannot import {module_name} ({e})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"--env {spec!r}: {module_name} has no callable {attr!r}")
    return factory


def _log_to_stderr() -> None:
    """INFO and up, timestamped; replaces a setup that an environment's imports made."""
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _robot_config(args: argparse.Namespace, robot_id: str, task: str):
    from actors.robot import RobotConfig

    try:
        return RobotConfig(
            robot_id=robot_id, spool_dir=args.spool or str(Path("spool") / robot_id),
            control_period_seconds=args.control_period,
            staleness_budget_seconds=args.staleness_budget, safe_action=args.safe_action,
            estop_file=args.estop_file or "", task=task, run_id=args.run_id,
            max_episodes=args.max_episodes, upload_retry_seconds=args.upload_retry,
            report_seconds=args.report_every)
    except ValueError as e:
        raise UsageError(f"robot: {e}") from None


def _checked_spec(path: str, environment):
    """The robot spec at `path`, once `environment` matches it."""
    from actors.robot_spec import RobotSpecError, load_robot_spec

    try:
        spec = load_robot_spec(path)
    except RobotSpecError as e:
        raise UsageError(f"--spec: {e}") from None
    problems = spec.environment_problems(environment)
    if problems:
        raise UsageError(f"--spec {path}: {'; '.join(problems)}")
    return spec


def cmd_robot(args: argparse.Namespace) -> int:
    import torch

    from actors.robot import RobotClient, RobotTaskError

    factory = load_env_factory(args.env)
    robot_id = args.robot_id or f"robot-{socket.gethostname()}"
    if args.identity and args.identity != robot_id:
        raise UsageError(f"--identity {args.identity}: a robot uploads only under its own id "
                         f"({robot_id}); drop --identity or pass --robot-id {args.identity}")
    security = client_security(args, args.gateway, robot_id)
    config = _robot_config(args, robot_id, args.task or "")
    torch.set_num_threads(1)  # one inference thread: no thread-pool stalls in the control loop
    try:
        environment = factory()
    except Exception as e:  # the environment factory failed
        raise UsageError(f"--env {args.env}: {type(e).__name__}: {e}") from None
    robot_spec = _checked_spec(args.spec, environment) if args.spec else None
    if robot_spec is not None:
        config = _robot_config(args, robot_id, args.task or robot_spec.task_name)
    _log_to_stderr()
    try:
        robot = RobotClient(config, args.gateway, lambda: environment, security, robot_spec)
    except SecurityError as e:
        raise UsageError(str(e)) from None
    watch_signals({signal.SIGUSR1: robot.estop, signal.SIGINT: robot.stop,
                   signal.SIGTERM: robot.stop})
    print(f"{robot_id}: gateway {args.gateway}, spool {config.spool_dir}", flush=True)
    try:
        stats = robot.run(drain_seconds=args.drain_seconds)
    except RobotTaskError as e:
        if args.stats:
            Path(args.stats).write_text(json.dumps(vars(robot.stats)))
        raise UsageError(f"{robot_id}: {e}") from None
    print(f"{robot_id}: {stats.episodes} episodes, {stats.uploaded} uploaded, "
          f"{stats.safe_idle_entries} safe idles, {stats.actions_clipped} clipped actions, "
          f"max step {stats.max_compute_seconds * 1000:.1f} ms"
          f"{', E-STOP' if stats.estopped else ''}", flush=True)
    if args.stats:
        Path(args.stats).write_text(json.dumps(vars(stats)))
    return 3 if stats.estopped else 0


def cmd_fleet(args: argparse.Namespace) -> int:
    from cluster.robots import continue_cycle, fleet_table
    from replay.storage import Storage

    if not Storage(args.run).exists("config.yaml"):
        raise UsageError(f"fleet: {args.run} holds no run (no config.yaml)")
    if args.action == "status":
        print(fleet_table(args.run))
    else:
        try:
            cycle = continue_cycle(args.run)
        except ValueError as e:
            raise UsageError(f"fleet continue: {e}") from None
        print(f"cycle {cycle} continues with the robot episodes that arrived", flush=True)
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    if args.action == "gen-certs":
        from policies.certs import generate_dev_credentials

        if not args.target:
            raise UsageError("policy gen-certs needs an output directory")
        if (Path(args.target) / "ca.pem").exists():
            raise UsageError(f"{args.target} already holds a CA (ca.pem); pick a new directory "
                             "so existing credentials are not replaced by accident")
        clients = ["learner", "actor", "operator", *(args.robot or ["robot-1"])]
        roles = generate_dev_credentials(args.target, clients, args.host or [], args.days)
        print(f"wrote a development CA, a server certificate and {len(roles)} client "
              f"credentials to {args.target}: " + ", ".join(f"{i} ({r})" for i, r in roles.items()))
        return 0
    if args.action == "serve":
        return _serve(args)
    return _operate(args)


def _operate(args: argparse.Namespace) -> int:
    import grpc

    from policies.client import PolicyClient

    if not args.target:
        raise UsageError(f"policy {args.action} needs the server address: HOST:PORT")
    default_identity = "learner" if args.action == "publish" else "operator"
    security = client_security(args, args.target, args.identity or default_identity)
    try:
        client = PolicyClient(args.target, timeout=30, security=security)
    except SecurityError as e:
        raise UsageError(str(e)) from None
    with client:
        try:
            if args.action == "ls":
                reply = client.list()
                for v in reply.versions:
                    meta = json.loads(v.metadata_json)
                    print(f"v{v.version:<6} {v.total_bytes:>12} bytes  cycle "
                          f"{meta.get('cycle', '-')}  learner_step {meta.get('learner_step', '-')}"
                          f"  sha256 {v.sha256[:12]}")
            elif args.action == "publish":
                print(f"published v{client.publish(_stored_snapshot(args))} to {args.target}")
                return 0
            elif args.action == "pin":
                if args.version is None:
                    raise UsageError("policy pin needs --version N")
                reply = client.pin(args.version, args.client or "")
            else:
                reply = client.unpin(args.client or "")
        except grpc.RpcError as e:
            raise UsageError(f"policy {args.action}: {e.code().name}: {e.details()}") from None
    print(f"fleet pin: {reply.fleet_pin or 'none'}; client pins: "
          f"{dict(reply.client_pins) or 'none'}")
    return 0


def _stored_snapshot(args: argparse.Namespace):
    """The snapshot `--snapshot runs/<run>/policies/vNNNNNN.json` names, hash-checked, with
    `--as-version` replacing its version (a gateway's versions advance on their own)."""
    import dataclasses

    from policies.snapshot import load_snapshot

    if not args.snapshot:
        raise UsageError("policy publish needs --snapshot runs/<run>/policies/vNNNNNN.json")
    try:
        snapshot = load_snapshot(args.snapshot)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--snapshot {args.snapshot}: {e}") from None
    if args.as_version:
        snapshot = dataclasses.replace(snapshot, version=args.as_version)
    return snapshot


def _server_security(args: argparse.Namespace) -> ServerSecurity:
    if args.credentials:
        security = ServerSecurity.from_dir(args.credentials, mtls=not args.no_client_certs)
    else:
        security = ServerSecurity(args.cert or "", args.key or "", args.client_ca or "",
                                  args.tokens or "", allow_plaintext=args.plaintext)
    return security


def _serve(args: argparse.Namespace) -> int:
    from policies.server import PolicyServer
    from replay.archive import EpisodeArchive
    from replay.ingest import EpisodeSink

    if not args.config or not args.target:
        raise UsageError("policy serve needs a run directory and --config FILE")
    if args.host and len(args.host) > 1:
        raise UsageError("policy serve: --host binds one address")
    config = load_config_args(args)
    run_dir = Path(args.target).absolute()
    adder = None
    if args.replay:
        from replay.adders import ReverbSequenceAdder

        adder = ReverbSequenceAdder(args.replay, config.replay)
    sink = EpisodeSink(config.env.spec(), EpisodeArchive(run_dir / "archive"), adder,
                       run_dir / "quarantine")
    host = args.host[0] if args.host else "127.0.0.1"
    registry = clock = None
    if args.metrics_port is not None:  # the gateway's own metrics (docs/operations.md)
        from prometheus_client import CollectorRegistry

        from cluster.metrics import quarantine_collector
        from cluster.process import ScrapeClock, start_metrics_server

        registry, clock = CollectorRegistry(), ScrapeClock()
        registry.register(clock)  # first: a scrape that began after a value was set reads it
        registry.register(quarantine_collector(sink))
        try:
            metrics = start_metrics_server(host, args.metrics_port, registry, clock)
        except OSError as e:
            raise UsageError(f"--metrics-port {args.metrics_port}: {e.strerror}") from None
        print(f"metrics on http://{host}:{metrics.server_port}/metrics", flush=True)
    try:
        server = PolicyServer(run_dir / "policies", host=host, port=args.port,
                              security=_server_security(args), limits=config.gateway,
                              episode_handler=lambda e: sink.ingest(e, to_replay=True),
                              registry=registry)
    except SecurityError as e:
        raise UsageError(str(e)) from None
    stop = ShutdownSignals()
    _log_to_stderr()
    try:
        address = server.start()
    except RuntimeError as e:  # the address could not be bound
        raise UsageError(str(e)) from None
    print(f"policy server listening on {address} (versions in {run_dir / 'policies'}, "
          f"uploads to {run_dir / 'archive'})", flush=True)
    stop.wait()
    server.stop()
    print("policy server stopped", flush=True)
    if clock is not None:  # its final counts, to a Prometheus that scrapes it
        clock.final_scrape(config.cluster.final_scrape_seconds)
    return 0


def add_fleet_commands(sub) -> None:
    robot = sub.add_parser("robot", help="run a dm_env environment as a robot client")
    robot.add_argument("--gateway", required=True, help="policy server HOST:PORT")
    robot.add_argument("--env", required=True,
                       help="MODULE:FACTORY returning a dm_env.Environment, "
                            "e.g. actors.standins:cartpole")
    robot.add_argument("--robot-id", help="identity and lineage id (default robot-<hostname>)")
    robot.add_argument("--spool", help="episode spool directory (default spool/<robot-id>)")
    robot.add_argument("--control-period", type=float, default=0.05, metavar="SECONDS")
    robot.add_argument("--staleness-budget", type=float, default=5.0, metavar="SECONDS",
                       help="safe idle when the server has been silent this long")
    robot.add_argument("--safe-action", type=float, default=0.0,
                       help="value of every action dimension in safe idle")
    robot.add_argument("--estop-file", help="e-stop as soon as this file exists (also SIGUSR1)")
    robot.add_argument("--spec", help="the robot's spec YAML (docs/robots.md): the environment "
                                      "must match it, and the robot acts on task robot:<name>")
    robot.add_argument("--task", help="task name in the policy's env spec (default: robot:<name> "
                                      "of --spec, else the policy's first task)")
    robot.add_argument("--run-id", default="robot", help="lineage run_id of the episodes")
    robot.add_argument("--max-episodes", type=int, default=0, help="0 = until stopped")
    robot.add_argument("--upload-retry", type=float, default=1.0, metavar="SECONDS")
    robot.add_argument("--report-every", type=float, default=5.0, metavar="SECONDS",
                       help="status reports to the gateway (pacflow fleet status)")
    robot.add_argument("--drain-seconds", type=float, default=10.0,
                       help="at exit, keep uploading the spool this long")
    robot.add_argument("--stats", help="write the run's counters here as JSON")
    add_credential_flags(robot, "credential identity (default: the robot id)")
    robot.set_defaults(func=cmd_robot)

    fleet = sub.add_parser("fleet", help="a run's robots: what each uploaded; continue a cycle")
    fleet.add_argument("action", choices=["status", "continue"])
    fleet.add_argument("run", help="the run's directory or storage URI")
    fleet.set_defaults(func=cmd_fleet)

    policy = sub.add_parser("policy", help="serve, inspect and pin policy versions")
    policy.add_argument("action", choices=["serve", "ls", "publish", "pin", "unpin",
                                           "gen-certs"])
    policy.add_argument("target", nargs="?",
                        help="serve: run directory; ls/publish/pin/unpin: server HOST:PORT; "
                             "gen-certs: output directory")
    policy.add_argument("--version", type=int, help="pin: the version to run")
    policy.add_argument("--snapshot", help="publish: a stored snapshot's .json file")
    policy.add_argument("--as-version", type=int, help="publish: under this version number")
    policy.add_argument("--client", help="pin/unpin: one client id (default: the whole fleet)")
    policy.add_argument("--config", help="serve: YAML config (env spec for upload validation)")
    policy.add_argument("--set", action="append", metavar="KEY=VALUE")
    policy.add_argument("--host", action="append",
                        help="serve: address to bind (once); gen-certs: extra server names")
    policy.add_argument("--port", type=int, default=0, help="serve: port (default: a free one)")
    policy.add_argument("--replay", help="serve: Reverb HOST:PORT that uploads also go to")
    policy.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve: Prometheus metrics on this port of the bound address "
                             "(0: a free one; default: none)")
    policy.add_argument("--client-ca", help="serve: require client certificates from this CA")
    policy.add_argument("--tokens", help="serve: tokens file (sha256 digests, roles)")
    policy.add_argument("--plaintext", action="store_true",
                        help="serve: allow plaintext (loopback only)")
    policy.add_argument("--no-client-certs", action="store_true",
                        help="serve with --credentials: TLS and tokens, no client certificates")
    policy.add_argument("--robot", action="append", help="gen-certs: a robot identity (repeat)")
    policy.add_argument("--days", type=int, default=30, help="gen-certs: validity")
    add_credential_flags(policy, "ls/pin/unpin: credential identity (default operator); "
                                 "serve: --cert/--key are the server's own")
    policy.set_defaults(func=cmd_policy)
