"""Live progress: plain lines off a terminal, a rich display on one, both from the processes'
metrics endpoints as listed in the run's targets."""

import io
import json

from prometheus_client import CollectorRegistry, Counter, start_http_server

from cluster.progress import CycleProgress
from tests.processes import until


def _endpoint(run, name: str) -> Counter:
    """A real metrics endpoint of a process `name`, announced in the run's targets."""
    registry = CollectorRegistry()
    server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    target = run / "metrics" / "targets" / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps([{"targets": [f"127.0.0.1:{server.server_port}"],
                                   "labels": {"instance_name": name}}]))
    return registry


class Lines(io.StringIO):
    def lines(self) -> list[str]:
        return [line for line in self.getvalue().splitlines() if line]


def test_plain_lines_count_from_the_phase_start_with_rate_and_eta(tmp_path):
    learner = Counter("pacflow_learner_updates", "", registry=_endpoint(tmp_path, "learner"))
    learner.inc(500)  # updates of earlier cycles: not this phase's
    out = Lines()
    progress = CycleProgress(str(tmp_path), out, tty=False, plain_every=0.2, poll=0.05)
    try:
        progress.phase(3, "train", {"learner": 1000})
        learner.inc(250)
        line = until(lambda: next((x for x in out.lines() if "250/1000" in x), None),
                     "a progress line")
        assert line.startswith("  cycle 3 train: learner 250/1000 updates (")
        assert "/s, ETA " in line
    finally:
        progress.close()


def test_episodes_per_actor_on_a_terminal(tmp_path):
    episodes = {}
    for name in ("actor-0", "actor-1"):
        episodes[name] = Counter("pacflow_actor_episodes", "", ["mode", "task"],
                                 registry=_endpoint(tmp_path, name))
    out = io.StringIO()
    progress = CycleProgress(str(tmp_path), out, tty=True, poll=0.05)
    try:
        progress.phase(0, "collect", {"actor-0": 8, "actor-1": 8})
        episodes["actor-0"].labels("collect", "t").inc(3)
        episodes["actor-1"].labels("eval", "t").inc(5)  # eval episodes are not collect's
        until(lambda: "3/8" in out.getvalue(), "actor-0's bar at 3/8")
        screen = out.getvalue()
        assert "cycle 0 collect actor-0" in screen and "cycle 0 collect actor-1" in screen
        assert "0/8" in screen and "5/8" not in screen
    finally:
        progress.close()
