"""Bad input to `pacflow`: one line on stderr, exit code 2, no traceback."""

import subprocess
import sys

import pytest

GOOD = """env: {tasks: [dm_control:cartpole-swingup]}
loop: {num_cycles: 1, episodes_per_cycle: 2, learner_steps_per_cycle: 1}
"""


def _pacflow(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("content,args,needle", [
    (GOOD.replace("cartpole-swingup", "cartpole-flip"), [], "env.tasks: unknown task"),
    ("loop: {num_cycles: 1, episodes_per_cycle: 2, learner_steps_per_cycle: 1}\n", [],
     "env: missing required field"),
    (GOOD + "learner: {batch_size: lots}\n", [], "learner.batch_size: expected int"),
    (GOOD, ["--set", "replay.n_step=zero"], "replay.n_step: expected int"),
    ("env: [unclosed\n", [], "not valid YAML"),
    (GOOD, ["--set", "cluster.host=0.0.0.0"], "cluster.policy_credentials: required"),
    (GOOD, ["--set", "gateway.max_upload_bytes=0"], "gateway.max_upload_bytes=0 must be > 0"),
    (GOOD, ["--set", "cluster.policy_credentials=/nonexistent/creds"],
     "cluster.policy_credentials: ca_file: cannot read /nonexistent/creds/ca.pem"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, content, args, needle):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    result = _pacflow("run", "--config", str(path), "--run-dir", str(tmp_path / "run"), *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_unreadable_config_file(tmp_path):
    result = _pacflow("run", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"pacflow: error: config file {tmp_path / 'missing.yaml'}: No such file or directory"]


def test_bad_arguments_are_one_line():
    result = _pacflow("run")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--config" in result.stderr


def test_unreachable_run_storage_fails_before_anything_starts(tmp_path, s3_prefix):
    """An S3 bucket that does not exist: one line naming the URI, before Ray or any actor."""
    import os

    (tmp_path / "c.yaml").write_text(GOOD)
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "run", "--config", str(tmp_path / "c.yaml"),
         "--run-dir", "s3://no-such-bucket-9/run"], capture_output=True, text=True,
        timeout=120, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})  # Ray would fail loudly
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3://no-such-bucket-9/run is not writable" in lines[0], lines


@pytest.mark.slow
@pytest.mark.parametrize("setting,needles", [
    ("cluster.actor_resource=gpu-rack-7", ["cluster.actor_resource: no node", "'gpu-rack-7'"]),
    ("cluster.num_actors=64", ["cluster: the run reserves 65 CPUs",
                               "num_actors * actor_cpus + learner_cpus"]),
])
def test_a_placement_no_cluster_can_hold_is_refused_instead_of_waiting_forever(
        tmp_path, setting, needles):
    (tmp_path / "c.yaml").write_text(GOOD)
    result = _pacflow("run", "--config", str(tmp_path / "c.yaml"), "--run-dir",
                      str(tmp_path / "run"), "--set", setting)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in needles), result.stderr
    assert not (tmp_path / "run").exists()


def test_a_hostile_robot_id_is_refused_before_anything_is_written(tmp_path):
    result = _pacflow("robot", "--gateway", "127.0.0.1:1", "--env", "actors.standins:cartpole",
                      "--robot-id", "../../etc", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "robot_id: '../../etc' is not" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
