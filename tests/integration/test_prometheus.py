"""A real Prometheus (Debian's package) scrapes a run through the discovery a user configures
(deploy/prometheus/ and `pacflow metrics targets --watch`): a run mixing a sim actor and a robot
process (env.tasks with a robot spec and a simulator task), 4 cycles. During
the run the actor is SIGKILLed (Ray restarts it), a bad episode is uploaded, a client calls
Act, and the replay process is SIGSTOPped until an alert fires. Afterwards every Grafana panel's
expression has data, the actor's counters never went down, and the run ended normally."""

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from policies.client import PolicyClient
from replay.archive import EpisodeArchive
from replay.spec import EnvSpec
from tests.fakes import make_episode
from tests.processes import ray_pids, until

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "cluster.cli"]
RATE_INTERVAL = "10s"  # Grafana's $__rate_interval for a 1 s scrape interval is at least 4 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prom:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params) -> dict:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list:
        return self.get("/api/v1/query", query=expr)["result"]

    def series(self, expr: str, start: float, end: float) -> list:
        return self.get("/api/v1/query_range", query=expr, start=start, end=end,
                        step="1s")["result"]

    def firing(self) -> set[str]:
        return {a["labels"]["alertname"] for a in self.get("/api/v1/alerts")["alerts"]
                if a["state"] == "firing"}


def _start_prometheus(tmp_path: Path, storage: Path) -> tuple[list[subprocess.Popen], Prom]:
    """deploy/prometheus/ as a user runs it: `pacflow metrics targets --under STORAGE --watch`
    writing the file_sd file prometheus.yml reads, and alerts.yml, with the scrape and rule
    intervals cut to 1 s and every alert's `for:` to 3 s."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus missing: `make test` installs Debian's prometheus package"
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    (job,) = config["scrape_configs"]
    job["file_sd_configs"][0]["refresh_interval"] = "1s"
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "3s"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    storage.mkdir()
    sidecar = subprocess.Popen(
        [*CLI, "metrics", "targets", "--under", str(storage), "--out",
         str(tmp_path / "targets/runs.json"), "--watch", "1"], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "sidecar.log", "w"))
    port = _free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    prom = Prom(port)

    def ready():
        try:
            with urllib.request.urlopen(f"{prom.base}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return proc.poll() is not None and pytest.fail((tmp_path / "prometheus.log")
                                                           .read_text()[-2000:])
    until(ready, "prometheus to be ready", timeout=60)
    return [proc, sidecar], prom


def _bad_episode(run: Path):
    """A robot episode with a non-finite reward: the gateway quarantines it."""
    spec = EnvSpec.from_dict(json.loads((run / "env_spec.json").read_text()))
    episode = make_episode(spec=spec, length=5, seed=7)
    episode.reward[2] = np.nan
    return dataclasses.replace(episode, lineage=dataclasses.replace(
        episode.lineage, actor_id="robot-1", task=spec.task_names[0]))


@pytest.mark.timeout(600)
def test_prometheus_scrapes_a_run_every_panel_has_data_and_an_alert_fires(tmp_path):
    rng = random.Random(20261203)
    storage, home = tmp_path / "runs", tmp_path / "home"
    home.mkdir()
    services, prom = _start_prometheus(tmp_path, storage)
    port = _free_port()
    driver = subprocess.Popen(
        [*CLI, "run", "--config", "deploy/configs/robot_fleet.yaml",
         "--set", "env.tasks=[robot:deploy/robots/cartpole.yaml, dm_control:cartpole-swingup]",
         "--set", "cluster.num_actors=1", "--set", "cluster.actor_cpus=0.5",
         "--set", "loop.num_cycles=4", "--set", "loop.episodes_per_cycle=4",
         "--set", "loop.robot_episodes_per_cycle=2", "--set", "loop.eval_episodes=2",
         "--set", f"cluster.policy_port={port}", "--set", f"cluster.storage={storage}"],
        cwd=ROOT, env={**os.environ, "HOME": str(home)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(driver.stdout), daemon=True)
    reader.start()
    robot = subprocess.Popen(
        [*CLI, "robot", "--gateway", f"127.0.0.1:{port}", "--env", "actors.standins:cartpole",
         "--spec", "deploy/robots/cartpole.yaml", "--robot-id", "robot-1", "--spool",
         str(tmp_path / "spool"), "--control-period", "0.02", "--drain-seconds", "0",
         "--report-every", "1"],
        cwd=ROOT, env={**os.environ, "PACFLOW_STANDIN_TIME_LIMIT": "1.0"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.time()
    stopped = []
    try:
        def alive(condition):
            if driver.poll() is not None:
                pytest.fail("run ended early:\n" + "".join(output)[-4000:])
            return condition()

        (run,) = until(lambda: alive(lambda: list(storage.glob("*"))), "the run folder", 120)
        run_id = run.name
        steps = 'pacflow_actor_env_steps_total{instance_name="actor-0"}'
        # SIGKILL the actor once it has collected a drawn number of steps (whole waves).
        threshold = rng.randrange(1, 4) * 1000
        until(lambda: alive(lambda: any(float(r["value"][1]) >= threshold
                                        for r in prom.query(steps))),
              f"actor-0 past {threshold} env steps", timeout=240)
        (victim,) = until(lambda: alive(lambda: ray_pids("ray::CollectorWorker", str(home))),
                          "the actor's process")
        os.kill(victim, signal.SIGKILL)
        until(lambda: alive(lambda: prom.query(
            'pacflow_process_restarts_total{instance_name="actor-0"} >= 1')),
            "the restarted actor's restart count in Prometheus", timeout=240)

        # A bad upload (quarantined) and Act calls through the run's gateway.
        with PolicyClient(f"127.0.0.1:{port}") as client:
            reply = client.upload_episode(_bad_episode(run))
            assert "reward" in reply.quarantined
            spec = EnvSpec.from_dict(json.loads((run / "env_spec.json").read_text()))
            for _ in range(5):
                client.act(np.zeros(spec.obs_dim, np.float32), task_id=0)

        # Freeze the replay process until Prometheus fires PacflowReplayDown.
        (replay,) = ray_pids("ray::ReplayWorker", str(home))
        os.kill(replay, signal.SIGSTOP)
        stopped.append(replay)
        until(lambda: "PacflowReplayDown" in prom.firing(), "PacflowReplayDown to fire",
              timeout=60)
        os.kill(replay, signal.SIGCONT)
        stopped.clear()
        until(lambda: "PacflowReplayDown" not in prom.firing(), "the alert to resolve",
              timeout=60)
        driver.wait(timeout=400)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        robot.send_signal(signal.SIGTERM)
        robot.wait(timeout=60)
        if driver.poll() is None:
            driver.kill()
        reader.join(timeout=10)
    try:
        text = "".join(output)
        assert driver.returncode == 0, text[-4000:]
        # Up to a second after the driver's end, so the range's last step (1 s apart) comes
        # after the final scrape the run waited for (cluster.final_scrape_seconds).
        end = time.time() + 1

        # Every panel's expression has data for this run: a finite value at some time.
        dash = json.loads((ROOT / "deploy/grafana/pacflow.json").read_text())
        empty = []
        for panel in (p for p in dash["panels"] if p["type"] != "row"):
            for target in panel["targets"]:
                expr = target["expr"].replace("$run_id", run_id) \
                    .replace("$__rate_interval", RATE_INTERVAL)
                values = [float(v) for s in prom.series(expr, started, end) for _, v in s["values"]]
                if not any(math.isfinite(v) for v in values):
                    empty.append(f"{panel['title']}: {expr}")
        assert empty == []

        # The actor's counters only grew, across its restart: one series (prometheus.yml
        # names the instance after the process), two endpoints.
        (restarts,) = prom.series('pacflow_process_restarts_total{instance_name="actor-0"}',
                                  started, end)
        assert [float(v) for _, v in restarts["values"]][::len(restarts["values"]) - 1] == \
            [0.0, 1.0]  # as PacflowRestartLoop reads it: increase() sees the restart
        assert prom.series('increase(pacflow_process_restarts_total{instance_name="actor-0"}'
                           '[1m]) > 0', started, end)
        actor0 = [e for e in EpisodeArchive(run / "archive").episodes()
                  if e.lineage.actor_id == "actor-0"]
        for name, final in (("pacflow_actor_env_steps_total", 1000 * len(actor0)),
                            ("pacflow_actor_episodes_total", len(actor0))):
            (series,) = prom.series(f'sum({name}{{instance_name="actor-0"}})', started, end)
            values = [float(v) for _, v in series["values"]]
            assert values == sorted(values), f"{name} went down: {values}"
            # Nothing counted twice although Ray repeated the killed actor's call: each
            # archived episode once (a cartpole episode is 1000 env steps).
            assert values[-1] == final, (name, values[-1], final)
        # A run mixing a sim task and a robot (env.tasks): the sim actor collects and evaluates
        # the simulator task while each cycle waits for the robot; the folder is named after
        # the spec file.
        assert run.name.endswith("-cartpole")
        by_actor = {(e.lineage.actor_id, e.lineage.task, e.task_id, e.lineage.mode)
                    for e in EpisodeArchive(run / "archive").episodes()}
        assert ("robot-1", "robot:cartpole-standin", 0, "collect") in by_actor
        assert ("actor-0", "dm_control:cartpole-swingup", 1, "collect") in by_actor
        assert ("actor-0", "dm_control:cartpole-swingup", 1, "eval") in by_actor
        assert {a for a, *_ in by_actor} == {"robot-1", "actor-0"}
        state = json.loads((run / "cycle.json").read_text())
        assert state["rows"][-1]["eval_return"] is not None
        assert state["eval_by_task"].keys() == {"dm_control:cartpole-swingup"}
        # The run's own numbers agree with the scraped ones.
        assert len(state["rows"]) == 4
        (scraped,) = prom.series(f'max(pacflow_run_cycle{{run_id="{run_id}"}})', started, end)
        assert max(float(v) for _, v in scraped["values"]) == 3
        (quarantined,) = prom.series(
            'sum(pacflow_episodes_quarantined_total{reason="reward"})', started, end)
        assert float(quarantined["values"][-1][1]) == 1
        # The sidecar's file lists no target once the run has ended (the driver clears them).
        assert json.loads((tmp_path / "targets/runs.json").read_text()) == []
    finally:
        for service in services:
            service.terminate()
            service.wait(timeout=30)
