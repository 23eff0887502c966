"""Resuming checks the stored config: one clear error, never a traceback."""

import json

import pytest
import yaml

from cluster.config import config_from_dict, config_to_dict
from cluster.driver import RunDirError, prepare_run_dir

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
