"""The cluster-launcher config (checked by Ray's own validator), the per-stage settings file, the
KubeRay manifests and the Dockerfile they name. No cloud or Kubernetes call is made."""

import copy
import re

import pytest
import yaml
from conftest import REPO

from cluster.config import ActorConfig, ClusterConfig, RayRuntimeConfig, load_cluster_config, resolve_cluster_config
from reco.errors import ConfigError

LAUNCHER = REPO / "ray_config.yaml"
SETTINGS = REPO / "configs" / "cluster.yaml"


def _launcher():
    return yaml.safe_load(LAUNCHER.read_text())


def _prepared(cfg):
    """What `ray up` does before touching a cloud: merge the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_launcher_config_passes_rays_own_validator():
    import ray

    cfg = _launcher()
    prepared = _prepared(cfg)
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"]
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["max_workers"] == 0 and head["node_config"]["InstanceType"]
    gpu = [t for name, t in types.items() if name != prepared["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1, "one autoscaling GPU worker group"
    gpu = gpu[0]
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= prepared["max_workers"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p")), "a GPU instance type"
    # the container pins the same Ray as this client
    assert prepared["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    # this package with its GPU extra on the GPU workers (and the extra exists in pyproject.toml)
    assert any('pip install ".[gpu]"' in c for c in prepared["worker_setup_commands"])
    assert re.search(r"^gpu\s*=", (REPO / "pyproject.toml").read_text(), re.M)
    # token auth wired in: the token file is mounted on every node, every ray start requires it
    assert prepared["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for cmds in (prepared["head_start_ray_commands"], prepared["worker_start_ray_commands"]):
        start = [c for c in cmds if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH=" in c for c in start)
    assert any("--dashboard-host=127.0.0.1" in c for c in prepared["head_start_ray_commands"])
    # no credential in the file: the AWS chain on the laptop, instance profiles on the nodes
    text = LAUNCHER.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|RAY_AUTH_TOKEN=", text)


def test_launcher_validator_rejects_typos_and_bad_resources():
    import jsonschema

    cfg = _launcher()
    typo = copy.deepcopy(cfg)
    typo["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        _prepared(typo)
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5  # resources are integers
    with pytest.raises(jsonschema.ValidationError):
        _prepared(bad)
    node_typo = copy.deepcopy(cfg)
    node_typo["available_node_types"]["gpu_worker"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        _prepared(node_typo)


def test_settings_file_is_the_default_and_parses_strictly(tmp_path):
    cfg = resolve_cluster_config(None)
    assert cfg == load_cluster_config(SETTINGS)
    assert cfg.ray == RayRuntimeConfig(env_vars={"HF_HUB_OFFLINE": "1"})  # the file states the secure defaults
    assert cfg.ray.auth_mode == "token" and cfg.ray.loopback_only and cfg.ray.dashboard_host == "127.0.0.1"
    assert isinstance(cfg.train, ActorConfig) and cfg.embed.batch_size == 16
    bad = tmp_path / "bad.yaml"
    for text, message in [
        ("ray:\n  disable_auth_for_local: true\n", "replaced by ray.auth_mode"),
        ("ray:\n  auth_mode: none\n", "ray.auth_mode must be one of"),
        ("ray:\n  dashbord_host: 0.0.0.0\n", "ray.dashbord_host"),
        ("ray:\n  dashboard_port: 70000\n", "dashboard_port"),
        ("ray: [1]\n", "ray: expected a mapping"),
        ("train:\n  batch_size: 0\n", "batch_size must be >= 1"),
        ("train:\n  workers: 2\n", "train.workers"),
    ]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_cluster_config(bad)
    assert load_cluster_config(
        {"train": {"num_actors": 4, "gpus_per_actor": 1, "cpus_per_actor": 0}}
    ).train == ActorConfig(num_actors=4, cpus_per_actor=0.0, gpus_per_actor=1.0)
    assert load_cluster_config(None) == ClusterConfig()


def test_launcher_config_given_as_settings_is_refused_with_the_right_file():
    with pytest.raises(ConfigError, match=r"cluster-launcher config .* configs/cluster.yaml"):
        resolve_cluster_config(str(LAUNCHER))


# -- KubeRay ------------------------------------------------------------------------------------
# No Kubernetes / CRD validator is pip-installable here, so the manifests are checked against the
# fields of KubeRay's ray.io/v1 types (RayCluster, RayJob) and of the core pod template.
RAYCLUSTER_SPEC = {
    "headGroupSpec",
    "workerGroupSpecs",
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headServiceAnnotations",
    "suspend",
    "authOptions",
    "managedBy",
    "gcsFaultToleranceOptions",
    "upgradeStrategy",
}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "numOfHosts",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "suspend",
    "idleTimeoutSeconds",
}
AUTOSCALER = {
    "resources",
    "image",
    "imagePullPolicy",
    "env",
    "envFrom",
    "volumeMounts",
    "securityContext",
    "idleTimeoutSeconds",
    "upscalingMode",
    "version",
}
RAYJOB_SPEC = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionStrategy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes",
    "suspend",
    "schedule",
}
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _manifest(name):
    docs = [d for d in yaml.safe_load_all((REPO / "deploy" / name).read_text()) if d]
    assert len(docs) == 1
    return docs[0]


def _check_container(c, ray_version, token=True):
    assert c["name"] and DNS1123.match(c["name"]) and c["image"]
    env = {e["name"]: e for e in c.get("env", [])}
    for e in env.values():
        assert set(e) <= {"name", "value", "valueFrom"} and ("value" in e) != ("valueFrom" in e)
        if "value" in e:
            assert isinstance(e["value"], str), e
    if token:
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "reco-ray-token" and ref["key"] == "auth_token"
    for kind in ("requests", "limits"):
        for q in c.get("resources", {}).get(kind, {}).values():
            assert isinstance(q, (str, int)) and re.match(r"^\d+(\.\d+)?(m|Ki|Mi|Gi|Ti)?$", str(q)), q


def _check_cluster_spec(spec, ray_version):
    assert set(spec) <= RAYCLUSTER_SPEC, set(spec) - RAYCLUSTER_SPEC
    assert spec["rayVersion"] == ray_version
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP and {"rayStartParams", "template"} <= set(head)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams are strings"
    for c in head["template"]["spec"]["containers"]:
        _check_container(c, ray_version)
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert set(g) <= WORKER_GROUP and {"groupName", "rayStartParams", "template"} <= set(g)
        assert DNS1123.match(g["groupName"])
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        for c in g["template"]["spec"]["containers"]:
            _check_container(c, ray_version)
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in groups for c in g["template"]["spec"]["containers"]]
    assert any(gpus), "a GPU worker group"
    assert spec.get("enableInTreeAutoscaling") is True


def test_kuberay_raycluster_manifest():
    import ray

    m = _manifest("raycluster.yaml")
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayCluster"
    assert DNS1123.match(m["metadata"]["name"])
    _check_cluster_spec(m["spec"], ray.__version__)


def test_kuberay_rayjob_manifest():
    import ray

    m = _manifest("rayjob.yaml")
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayJob"
    assert DNS1123.match(m["metadata"]["name"])
    spec = m["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    assert spec["entrypoint"].startswith("python -m jobs.cli ")
    job = spec["entrypoint"].split()[3]
    from jobs.cli import COMMANDS

    assert job in COMMANDS
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 0
    _check_cluster_spec(spec["rayClusterSpec"], ray.__version__)
    for c in spec["submitterPodTemplate"]["spec"]["containers"]:
        _check_container(c, ray.__version__)  # the submitter authenticates with the same token


def test_dockerfile_pins_the_clients_ray_and_installs_the_gpu_extra():
    import ray

    text = (REPO / "deploy" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in text
    assert 'pip install --no-cache-dir ".[gpu]"' in text
    for d in ("reco", "index", "cluster", "jobs", "configs"):
        assert f" {d} ./{d}" in text
        assert (REPO / d).is_dir()
    for name in ("raycluster.yaml", "rayjob.yaml"):
        images = re.findall(r"image:\s*(\S+)", (REPO / "deploy" / name).read_text())
        assert images and len(set(images)) == 1 and images[0] in text


def test_jobs_max_failed_fraction_is_a_user_setting(tmp_path):
    """#16: the share of failed inputs above which a job reports "failed" (exit 1) is the user's."""
    assert resolve_cluster_config(None).jobs.max_failed_fraction == 0.5  # stated in configs/cluster.yaml
    assert load_cluster_config({"jobs": {"max_failed_fraction": 0.9}}).jobs.max_failed_fraction == 0.9
    for value in (1.5, -0.1, "half", float("nan"), True):
        with pytest.raises(ConfigError, match="max_failed_fraction"):
            load_cluster_config({"jobs": {"max_failed_fraction": value}})
    with pytest.raises(ConfigError, match="jobs.max_failures"):
        load_cluster_config({"jobs": {"max_failures": 3}})
