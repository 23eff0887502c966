"""Resuming checks the stored config: one clear error, never a traceback."""

import json

import pytest
import yaml

from cluster.config import config_from_dict, config_to_dict
from cluster.preflight import RunDirError, prepare_run_dir

BASE = {"env": {"tasks": ["dm_control:cartpole-swingup"]},
        "loop": {"num_cycles": 2, "episodes_per_cycle": 4, "learner_steps_per_cycle": 10}}


def _stored_run(tmp_path, data):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "cycle.json").write_text(json.dumps({"completed_cycles": 0, "rows": []}))


def test_a_config_from_an_older_pacflow_is_refused_by_name(tmp_path):
    old = {**BASE, "learner": {"num_action_samples": 10}}  # a field that no longer exists
    _stored_run(tmp_path, old)
    with pytest.raises(RunDirError, match="no longer parses: learner.num_action_samples"):
        prepare_run_dir(config_from_dict(BASE), tmp_path, resume=True)


def test_resume_may_change_cycles_and_budget_but_nothing_else(tmp_path):
    _stored_run(tmp_path, config_to_dict(config_from_dict(BASE)))
    longer = {**BASE, "loop": {**BASE["loop"], "num_cycles": 5, "budget_seconds": 60}}
    assert prepare_run_dir(config_from_dict(longer), tmp_path, resume=True) == []
    other = {**BASE, "learner": {"alpha": 0.5}}
    with pytest.raises(RunDirError, match="differs"):
        prepare_run_dir(config_from_dict(other), tmp_path, resume=True)


@pytest.mark.parametrize("run,refused", [("/data/run", True), ("file:///mnt/shared/run", False),
                                         ("s3://bucket/run", False)])
def test_a_plain_local_path_is_refused_on_more_than_one_node(monkeypatch, run, refused):
    import ray

    from cluster.preflight import check_storage_reaches_every_node

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True},
                                               {"Alive": False}])
    if refused:
        with pytest.raises(RunDirError, match="has 2 nodes.*file:///data/run"):
            check_storage_reaches_every_node(run)
    else:
        check_storage_reaches_every_node(run)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    check_storage_reaches_every_node(run)  # one node: any path


def test_file_uri_is_a_local_folder(tmp_path):
    from replay.storage import Storage, is_remote

    store = Storage(f"file://{tmp_path}/run")
    store.put_bytes("cycle.json", b"{}")
    assert store.local and not is_remote(store.uri)
    assert (tmp_path / "run" / "cycle.json").read_bytes() == b"{}"


def test_a_process_exports_its_stored_restart_count_and_ships_its_log(tmp_path):
    """Outside a restarted Ray actor the count is read, not incremented."""
    import logging

    from cluster.process import RunProcess

    run = tmp_path / "run"
    (run / "restarts").mkdir(parents=True)
    (run / "restarts" / "actor-3.json").write_text(json.dumps({"restarts": 2}))
    process = RunProcess(str(run), "actor-3")
    try:
        assert process.restarts == 2
        assert process.registry.get_sample_value("pacflow_process_restarts_total") == 2.0
        logging.getLogger("test").warning("a line to ship")
        process.ship_logs()
        assert "a line to ship" in (run / "logs" / "actor-3.log").read_text()
        target = json.loads((run / "metrics" / "targets" / "actor-3.json").read_text())[0]
        assert target["labels"]["instance_name"] == "actor-3"
        assert target["labels"]["run_id"] == "run"
    finally:
        for handler in list(logging.getLogger().handlers):
            if isinstance(handler, logging.FileHandler):
                logging.getLogger().removeHandler(handler)
                handler.close()
