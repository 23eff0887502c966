"""deploy/: the image recipe, the Ray cluster launcher config and the KubeRay manifests.

The image cannot be built here (no network) and no Kubernetes is at hand, so these check what
can be checked: the launcher config against Ray's own JSON schema, the manifests against the
field names of KubeRay's ray.io/v1 CRDs, and every pacflow command line in them against the
real CLI parser and config loader."""

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from cluster.cli import make_parser
from cluster.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# Field names of KubeRay's ray.io/v1 CRDs (ray-operator/config/crd/bases), plus authOptions
# (RayClusterSpec, KubeRay >= 1.5). Required ones are checked separately.
RAYJOB_SPEC = {"clusterSelector", "entrypoint", "entrypointNumCpus", "entrypointNumGpus",
               "entrypointResources", "jobId", "metadata", "rayClusterSpec", "runtimeEnv",
               "runtimeEnvYAML", "shutdownAfterJobFinishes", "submitterPodTemplate", "suspend",
               "ttlSecondsAfterFinished"}
RAYCLUSTER_SPEC = {"autoscalerOptions", "enableInTreeAutoscaling", "headGroupSpec",
                   "headServiceAnnotations", "rayVersion", "workerGroupSpecs", "authOptions"}
HEAD_GROUP = {"enableIngress", "headService", "rayStartParams", "replicas", "serviceType",
              "template"}
WORKER_GROUP = {"groupName", "maxReplicas", "minReplicas", "rayStartParams", "replicas",
                "scaleStrategy", "template"}
AUTH_MODES = {"disabled", "token"}


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def _check_cluster_spec(spec: dict) -> set[str]:
    """Checks a RayCluster spec; returns the custom resources its groups declare."""
    assert set(spec) <= RAYCLUSTER_SPEC, set(spec) - RAYCLUSTER_SPEC
    assert spec["rayVersion"] == "2.60.0"  # the pinned Ray (deploy/constraints.txt)
    assert spec.get("authOptions", {}).get("mode", "token") in AUTH_MODES
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP and {"rayStartParams", "template"} <= set(head)
    groups = [head]
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP, set(group) - WORKER_GROUP
        assert {"groupName", "maxReplicas", "minReplicas", "rayStartParams",
                "template"} <= set(group)
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        groups.append(group)
    resources = set()
    for group in groups:
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), "rayStartParams are strings"
        if "resources" in params:  # a JSON object, quoted for the ray start command line
            resources |= set(json.loads(json.loads(params["resources"])))
        containers = group["template"]["spec"]["containers"]
        assert containers and all(re.fullmatch(r"pacflow:(cpu|cuda)", c["image"])
                                  for c in containers)
    return resources


def _check_pacflow_command(command: str, resources: set[str]) -> None:
    """The command parses with pacflow's CLI, its config and --set overrides load, and every
    custom resource it pins to is one the cluster declares."""
    argv = shlex.split(command)
    assert argv[0] == "pacflow"
    args = make_parser().parse_args(argv[1:])
    config = load_config(ROOT / args.config, args.set or [])
    assert args.run_dir.startswith("s3://") and args.address == "auto"
    c = config.cluster
    pinned = {c.server_resource, c.actor_resource, c.learner_resource} - {""}
    assert pinned and pinned <= resources, pinned - resources


def test_rayjob_matches_the_crd_fields_and_runs_a_valid_pacflow_command():
    job = _load("kuberay/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert set(job["spec"]) <= RAYJOB_SPEC and "entrypoint" in job["spec"]
    resources = _check_cluster_spec(job["spec"]["rayClusterSpec"])
    _check_pacflow_command(job["spec"]["entrypoint"], resources)


def test_raycluster_matches_the_crd_fields():
    cluster = _load("kuberay/raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert _check_cluster_spec(cluster["spec"]) == {"head", "collector", "learner"}


def test_networkpolicy_keeps_replay_inside_and_opens_only_the_policy_port():
    policy = _load("kuberay/networkpolicy.yaml")
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    rules = policy["spec"]["ingress"]
    open_ports = [p["port"] for r in rules if "from" not in r for p in r["ports"]]
    job = _load("kuberay/rayjob.yaml")["spec"]["entrypoint"]
    assert open_ports == [int(re.search(r"cluster.policy_port=(\d+)", job).group(1))]
    replay_port = int(re.search(r"cluster.replay_port=(\d+)", job).group(1))
    assert replay_port not in open_ports
    # Besides pacflow's own pods, only Prometheus pods come in (to scrape the metrics ports).
    peers = [peer for r in rules for peer in r.get("from", [])]
    assert [p["podSelector"]["matchLabels"] for p in peers] == [
        {"app": "pacflow"}, {"app.kubernetes.io/name": "prometheus"}]
    assert peers[1]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"}  # not any namespace's pods


def test_cluster_launcher_config_passes_rays_schema_and_declares_the_resources():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(os.path.dirname(ray.autoscaler.__file__))
                         / "ray-schema.json").read_text())
    config = _load("ray/cluster.yaml")
    jsonschema.validate(config, schema)
    declared = {r for t in config["available_node_types"].values() for r in t["resources"]}
    assert declared == _check_cluster_spec(_load("kuberay/raycluster.yaml")["spec"])
    config["available_node_types"]["head"]["not_a_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


def _pins(name: str) -> dict[str, str]:
    lines = (DEPLOY / name).read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


def test_dockerfile_copies_what_exists_and_pins_what_the_constraints_pin():
    text = (DEPLOY / "docker/Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-", text, re.M)
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    cpu, cuda = _pins("constraints.txt"), _pins("constraints-cuda.txt")
    assert f"torch=={cpu['torch']}" in text and f"torch=={cuda['torch']}" in text
    assert cuda == {**cpu, "torch": cpu["torch"].removesuffix("+cpu")}
