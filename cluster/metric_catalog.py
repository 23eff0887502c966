"""The catalog of a run's Prometheus metrics: every name, its type, the component that exports
it and its help text, and the fixed label values (loss terms, phases) and return buckets.

Names follow `pacflow_<component>_<what>_<unit>`: counters end in `_total`, times are seconds,
labels are bounded (mode, task, term, phase, reason; never an episode id). The full list, with
what each answers, is in docs/operations.md; `METRICS` below is the same list, checked against
it and against the Grafana dashboard by tests/cluster/test_metrics.py. The exporters are in
cluster/metrics.py (and policies/metrics.py for the policy server).
"""

from __future__ import annotations

# Episode returns: dm_control tasks score 0..1000 per 1000 steps; robots' rewards vary.
RETURN_BUCKETS = (0.0, 10.0, 25.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0, 800.0,
                  900.0, 1000.0)
LOSS_TERMS = ("loss", "l_imp", "l_bc", "l_q")  # PAC's total loss and its terms (learners/losses)
PHASES = ("start", "collect", "train", "evaluate", "publish", "done")  # a run's phases

# Every metric a run exports: (name as scraped, type, component, help). Histograms are listed
# by their base name (Prometheus adds _bucket, _sum and _count).
METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("pacflow_actor_env_steps_total", "counter", "actor",
     "environment steps collected, action repeats counted (label task)"),
    ("pacflow_actor_episodes_total", "counter", "actor",
     "episodes finished and archived (labels mode = collect|eval, task)"),
    ("pacflow_actor_episode_return", "histogram", "actor",
     "return of each finished episode (labels mode, task)"),
    ("pacflow_actor_policy_version", "gauge", "actor", "policy version the actor acts with"),
    ("pacflow_actor_staleness_versions", "gauge", "actor",
     "newest version the actor has received minus the one it acts with"),
    ("pacflow_actor_staleness_seconds", "gauge", "actor",
     "seconds since a newer version than the acting one arrived; 0 when acting with the newest"),
    ("pacflow_actor_env_steps_per_second", "gauge", "actor",
     "environment steps per second over the actor's last wave of episodes"),
    ("pacflow_replay_items", "gauge", "replay", "items in the replay table"),
    ("pacflow_replay_inserts_total", "counter", "replay",
     "items inserted since the replay server started"),
    ("pacflow_replay_samples_total", "counter", "replay",
     "items sampled since the replay server started"),
    ("pacflow_replay_rate_limiter_blocked_seconds_total", "counter", "replay",
     "seconds the rate limiter would have held an insert or a sample, whether or not one "
     "was waiting; sampled each second (label op)"),
    ("pacflow_replay_checkpoint_age_seconds", "gauge", "replay",
     "seconds since the last replay checkpoint (since start when none was taken)"),
    ("pacflow_learner_updates_total", "counter", "learner", "PAC updates done"),
    ("pacflow_learner_loss", "gauge", "learner",
     "each loss term, mean over the last window of updates (label term)"),
    ("pacflow_learner_temperature", "gauge", "learner", "the E-step temperature eta"),
    ("pacflow_learner_q_mean", "gauge", "learner", "mean Q of the scored actions"),
    ("pacflow_learner_grad_norm", "gauge", "learner", "gradient norm before clipping"),
    ("pacflow_learner_updates_per_second", "gauge", "learner",
     "updates per second over the last window"),
    ("pacflow_learner_data_wait_fraction", "gauge", "learner",
     "fraction of update time spent waiting for a batch, over the last window"),
    ("pacflow_learner_data_wait_seconds_total", "counter", "learner",
     "seconds updates waited for a batch"),
    ("pacflow_learner_update_seconds_total", "counter", "learner",
     "seconds spent in updates, data wait included"),
    ("pacflow_learner_replay_stalls_total", "counter", "learner",
     "times the batch iterator found replay unresponsive"),
    ("pacflow_policy_published_version", "gauge", "policyserver", "newest published version"),
    ("pacflow_policy_subscribers", "gauge", "policyserver", "open Subscribe streams"),
    ("pacflow_policy_push_seconds", "histogram", "policyserver",
     "time to stream one version to one subscriber"),
    ("pacflow_policy_uploads_total", "counter", "policyserver",
     "robot uploads by result: stored, duplicate, quarantined, refused (label result)"),
    ("pacflow_policy_act_seconds", "histogram", "policyserver", "Act call latency"),
    ("pacflow_episodes_quarantined_total", "counter", "actor, policyserver",
     "episodes refused by validation (label reason: the field of their first problem)"),
    ("pacflow_robot_connected", "gauge", "policyserver",
     "1 when the robot reported or uploaded in the last 15 s (label robot)"),
    ("pacflow_robot_last_seen_age_seconds", "gauge", "policyserver",
     "seconds since the robot last reported or uploaded (label robot)"),
    ("pacflow_robot_episodes_total", "counter", "policyserver",
     "robot episodes accepted, all versions (label robot)"),
    ("pacflow_robot_uploads_refused_total", "counter", "policyserver",
     "robot uploads refused by validation (label robot)"),
    ("pacflow_robot_acting_version", "gauge", "policyserver",
     "version the robot acts with, as it reported (label robot)"),
    ("pacflow_robot_spool_depth", "gauge", "policyserver",
     "episodes waiting in the robot's spool, as it reported (label robot)"),
    ("pacflow_robot_safe_idle_entries_total", "counter", "policyserver",
     "times the robot entered safe idle, as it reported (label robot)"),
    ("pacflow_robot_estopped", "gauge", "policyserver", "1 while the robot is e-stopped"),
    ("pacflow_run_cycle", "gauge", "driver", "the cycle in progress (0-based)"),
    ("pacflow_run_phase", "gauge", "driver", "1 for the phase in progress (label phase)"),
    ("pacflow_run_env_steps_total", "counter", "driver", "env steps in the run's rows"),
    ("pacflow_run_eval_return", "gauge", "driver", "the newest greedy evaluation's mean return"),
    ("pacflow_process_restarts_total", "counter", "every process",
     "times Ray restarted this process"),
)


def helps(component: str) -> dict[str, str]:
    """Help texts of a component's metrics, by the name prometheus_client takes (no _total)."""
    return {name.removesuffix("_total"): text for name, _, comp, text in METRICS
            if component in comp}


def help_text(name: str) -> str:
    """The help text of one metric, by the name prometheus_client takes (no _total)."""
    return next(text for n, _, _, text in METRICS if n.removesuffix("_total") == name)
