"""The cluster definitions in cluster/, checked offline (no Ray cluster, no cloud, no Kubernetes): launcher YAMLs
through Ray's own prepare_config + validate_config, KubeRay manifests through the KubeRay v1.7.0 CRD schema made
strict and the operator's cross-field rules (cluster/validate.py); then what raytrain expects of them."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from cluster import validate
from raytrain.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
STAGES = ("pretrain", "sft", "reward", "ppo")
SHARED = "/mnt/raytrain"  # the shared volume: data, run.root, the raytrain wheel


def load(name: str) -> dict:
    (doc,) = validate.load_documents(CLUSTER / name)
    return doc


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def group(doc: dict, i: int = 0) -> dict:
    return cluster_spec(doc)["workerGroupSpecs"][i]


def head(doc: dict) -> dict:
    return cluster_spec(doc)["headGroupSpec"]


def pod(group_spec: dict) -> dict:
    return group_spec["template"]["spec"]


# ---- every file validates -----------------------------------------------------------------------------------


def test_the_definitions_are_there():
    assert all(path.is_file() for path in LAUNCHERS)
    jobs = {load(f"kuberay/{p.name}")["spec"]["entrypoint"].split()[3] for p in MANIFESTS if "rayjob" in p.name}
    assert set(STAGES) <= jobs
    assert (CLUSTER / "kuberay" / "raycluster.yaml").is_file()


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_cluster_file_validates(path):
    assert validate.check_file(path) == []


# ---- KubeRay: a misspelt field fails, naming it -------------------------------------------------------------

TYPOS = {
    "rayClusterSpecc": ("kuberay/rayjob-pretrain.yaml", lambda d: d["spec"].update(rayClusterSpecc=d["spec"].pop(
        "rayClusterSpec")), "spec.rayClusterSpecc: unknown field (did you mean 'rayClusterSpec'?)"),
    "workerGroupSpec": ("kuberay/raycluster.yaml", lambda d: d["spec"].update(workerGroupSpec=d["spec"].pop(
        "workerGroupSpecs")), "spec.workerGroupSpec: unknown field (did you mean 'workerGroupSpecs'?)"),
    "minReplica": ("kuberay/rayjob-sft.yaml", lambda d: group(d).update(minReplica=group(d).pop("minReplicas")),
                   "spec.rayClusterSpec.workerGroupSpecs[0].minReplica: unknown field"),
    "shutdownAfterJobFinish": ("kuberay/rayjob-ppo.yaml", lambda d: d["spec"].update(shutdownAfterJobFinish=True),
                               "spec.shutdownAfterJobFinish: unknown field"),
    "metadata.lables": ("kuberay/raycluster.yaml", lambda d: d["metadata"].update(lables={"a": "b"}),
                        "metadata.lables: unknown field (did you mean 'labels'?)"),
    "container field": ("kuberay/raycluster.yaml",
                        lambda d: pod(head(d))["containers"][0].update(volumeMount=[]),
                        "spec.headGroupSpec.template.spec.containers[0].volumeMount: unknown field"),
    "runtime_env field": ("kuberay/rayjob-reward.yaml",
                          lambda d: d["spec"].update(runtimeEnvYAML="pipp: [raytrain]\n"),
                          "spec.runtimeEnvYAML.pipp: unknown runtime_env field (did you mean 'pip'?)"),
    "rayStartParams value not a string": ("kuberay/raycluster.yaml",
                                          lambda d: head(d)["rayStartParams"].update({"num-cpus": 0}),
                                          "spec.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'"),
    "missing metadata.name": ("kuberay/raycluster.yaml", lambda d: d["metadata"].pop("name"),
                              "metadata: 'name' is a required property"),
}


def test_the_schema_is_kuberay_v1_7_0_made_strict():
    schema = validate._validator("RayJob").schema
    worker = schema["properties"]["spec"]["properties"]["rayClusterSpec"]["properties"]["workerGroupSpecs"]["items"]
    assert worker["additionalProperties"] is False
    assert "minReplicas" not in worker["required"]  # defaulted by the API server, so it may be left out
    assert validate.SCHEMA_FILE.stat().st_size < 64 * 1024
    toy = validate.tighten({"type": "object", "required": ["a", "b"], "properties": {
        "a": {"type": "integer", "default": 0}, "b": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                                                     "properties": {"c": {"type": "string"}}}}})
    assert toy["additionalProperties"] is False and toy["required"] == ["b"]
    assert "additionalProperties" not in toy["properties"]["b"]  # unknown fields kept there by the API server


# ---- KubeRay: the operator's cross-field rules --------------------------------------------------------------


def _add_group(d):
    cluster_spec(d)["workerGroupSpecs"].append(copy.deepcopy(group(d)))


RULES = {
    # RayJob (ValidateRayJobSpec, validateDeletionConfiguration)
    "ttl needs shutdown": ("kuberay/rayjob-pretrain.yaml", lambda d: d["spec"].update(shutdownAfterJobFinishes=False),
                           "spec.ttlSecondsAfterFinished: 3600 needs shutdownAfterJobFinishes: true"),
    "ttl not negative": ("kuberay/rayjob-pretrain.yaml", lambda d: d["spec"].update(ttlSecondsAfterFinished=-1),
                         "spec.ttlSecondsAfterFinished: must not be negative"),
    "spec and selector": ("kuberay/rayjob-pretrain.yaml",
                          lambda d: d["spec"].update(clusterSelector={"ray.io/cluster": "raytrain"}),
                          "rayClusterSpec and clusterSelector are both set"),
    "spec or selector": ("kuberay/rayjob-tune.yaml", lambda d: d["spec"].pop("clusterSelector"),
                         "spec: set rayClusterSpec (a cluster for this job) or clusterSelector"),
    "selector names the cluster": ("kuberay/rayjob-tune.yaml", lambda d: d["spec"].update(clusterSelector={"a": "b"}),
                                   "spec.clusterSelector: needs a non-empty 'ray.io/cluster'"),
    "selector and backoffLimit": ("kuberay/rayjob-tune.yaml", lambda d: d["spec"].update(backoffLimit=2),
                                  "spec.backoffLimit: must be 0 with clusterSelector"),
    "suspend needs shutdown": ("kuberay/rayjob-tune.yaml", lambda d: d["spec"].update(suspend=True),
                               "spec.suspend: a RayJob can be suspended only with shutdownAfterJobFinishes: true"),
    "interactive and backoffLimit": ("kuberay/rayjob-sft.yaml",
                                     lambda d: d["spec"].update(submissionMode="InteractiveMode", backoffLimit=1),
                                     "spec.backoffLimit: must be 0 in InteractiveMode"),
    "deadline positive": ("kuberay/rayjob-sft.yaml", lambda d: d["spec"].update(activeDeadlineSeconds=0),
                          "spec.activeDeadlineSeconds: must be positive"),
    "runtime env a mapping": ("kuberay/rayjob-sft.yaml", lambda d: d["spec"].update(runtimeEnvYAML="- pip\n"),
                              "spec.runtimeEnvYAML: must be a YAML mapping"),
    "runtime env by Ray": ("kuberay/rayjob-sft.yaml", lambda d: d["spec"].update(runtimeEnvYAML="env_vars: {A: 1}"),
                           "runtime_env['env_vars'] must be of type Dict[str, str]"),
    "job name length": ("kuberay/rayjob-ppo.yaml", lambda d: d["metadata"].update(name="r" * 48),
                        "is longer than 47 characters"),
    "name a DNS-1035 label": ("kuberay/raycluster.yaml", lambda d: d["metadata"].update(name="Raytrain_1"),
                              "metadata.name: 'Raytrain_1' is not a DNS-1035 label"),
    # RayCluster spec (ValidateRayClusterSpec; the webhook's unique names), also inside a RayJob
    "min <= max": ("kuberay/rayjob-pretrain.yaml", lambda d: group(d).update(minReplicas=9),
                   "spec.rayClusterSpec.workerGroupSpecs[0]: minReplicas 9 is greater than maxReplicas 8"),
    "replicas <= max": ("kuberay/raycluster.yaml", lambda d: group(d).update(replicas=9),
                        "spec.workerGroupSpecs[0].replicas: 9 is outside [minReplicas 2, maxReplicas 8]"),
    "min <= replicas": ("kuberay/raycluster.yaml", lambda d: group(d).update(replicas=1),
                        "spec.workerGroupSpecs[0].replicas: 1 is outside [minReplicas 2, maxReplicas 8]"),
    "not negative": ("kuberay/raycluster.yaml", lambda d: group(d, 1).update(minReplicas=-1, replicas=0),
                     "spec.workerGroupSpecs[1]: minReplicas -1 and maxReplicas 8 must not be negative"),
    "unique group names": ("kuberay/rayjob-sft.yaml", _add_group, "'gpu-h100' is used twice"),
    "head container": ("kuberay/raycluster.yaml", lambda d: pod(head(d)).update(containers=[]),
                       "the head needs at least one container"),
    "worker container": ("kuberay/rayjob-reward.yaml", lambda d: pod(group(d)).update(containers=[]),
                         "a worker group needs at least one container"),
    "resources in one place": ("kuberay/raycluster.yaml", lambda d: head(d).update(resources={"CPU": "8"}),
                               "spec.headGroupSpec: resources set both in rayStartParams (num-cpus) and in resources"),
    "no rayStartParams labels": ("kuberay/raycluster.yaml", lambda d: group(d)["rayStartParams"].update(labels="a=b"),
                                 "spec.workerGroupSpecs[0].rayStartParams.labels: not supported"),
    "group label syntax": ("kuberay/raycluster.yaml", lambda d: group(d).update(labels={"gpu type": "h100"}),
                           "spec.workerGroupSpecs[0].labels: 'gpu type' is not a valid label key"),
    "idle timeout needs v2": ("kuberay/rayjob-pretrain.yaml", lambda d: group(d).update(idleTimeoutSeconds=60),
                              "workerGroupSpecs[0].idleTimeoutSeconds: needs autoscaler v2"),
    "v2 restartPolicy": ("kuberay/raycluster.yaml", lambda d: pod(group(d)).update(restartPolicy="Always"),
                         "spec.workerGroupSpecs[0].template.spec.restartPolicy: must be Never or unset"),
    "v2 env without autoscaling": ("kuberay/rayjob-ppo.yaml", lambda d: pod(head(d))["containers"][0].update(
        env=[{"name": "RAY_enable_autoscaler_v2", "value": "1"}]), "enableInTreeAutoscaling is not true"),
    "no suspended group when autoscaling": ("kuberay/raycluster.yaml", lambda d: group(d).update(suspend=True),
                                            "cannot be suspended with enableInTreeAutoscaling"),
}


@pytest.mark.parametrize("name", [*TYPOS, *RULES])
def test_a_misspelt_field_or_a_broken_operator_rule_fails_naming_it(name):
    file, mutate, expected = (TYPOS | RULES)[name]
    doc = load(file)
    mutate(doc)
    errors = validate.manifest_errors(doc)
    assert any(expected in error for error in errors), errors


# ---- launcher YAMLs -----------------------------------------------------------------------------------------

LAUNCHER_ERRORS = {
    "avaliable_node_types": (lambda c: c.update(avaliable_node_types=c.pop("available_node_types")),
                             "avaliable_node_types: unknown field (did you mean 'available_node_types'?)"),
    "node type field": (lambda c: c["available_node_types"]["gpu_h100"].update(min_worker=1),
                        "available_node_types.gpu_h100.min_worker: unknown field (did you mean 'min_workers'?)"),
    "resources stated": (lambda c: c["available_node_types"]["gpu_h100"].pop("resources"),
                         "available_node_types.gpu_h100: 'resources' is a required property"),
    "head type exists": (lambda c: c.update(head_node_type="ray.head.default"),
                         "`head_node_type` must be one of `available_node_types`"),
    "docker field": (lambda c: c["docker"].update(worker_imge="x"), "docker.worker_imge: unknown field"),
}


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
@pytest.mark.parametrize("name", LAUNCHER_ERRORS)
def test_a_broken_launcher_config_fails_in_rays_own_checks(path, name):
    mutate, expected = LAUNCHER_ERRORS[name]
    (config,) = validate.load_documents(path)
    mutate(config)
    errors = validate.launcher_errors(config)
    assert any(expected in error for error in errors), errors


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_heads_have_no_gpu_and_nodes_install_raytrain(path):
    (config,) = validate.load_documents(path)
    types = config["available_node_types"]
    head_type = types[config["head_node_type"]]
    assert head_type["resources"].get("GPU", 0) == 0 and "guestAccelerators" not in head_type["node_config"]
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types
    for node_type in gpu_types:  # GCP: the accelerators attached are the GPUs the autoscaler counts
        accelerators = node_type["node_config"].get("guestAccelerators")
        if config["provider"]["type"] == "gcp":
            assert sum(a["acceleratorCount"] for a in accelerators) == node_type["resources"]["GPU"]
    # This checkout is mounted and pip-installed, after PyTorch's pinned CUDA build.
    (mount,) = [remote for remote, local in config["file_mounts"].items() if local == "."]
    setup = config["setup_commands"]
    assert "torch==" in setup[0] and "--index-url https://download.pytorch.org/whl/cu" in setup[0]
    assert any(command.endswith(f"pip install --quiet {mount}") for command in setup[1:])
    assert all(image.startswith(f"rayproject/ray:{ray.__version__}-py311") for image in (
        config["docker"]["image"], config["docker"]["head_image"]))
    assert any(SHARED in command for command in config["initialization_commands"])


# ---- KubeRay: what raytrain expects of the manifests --------------------------------------------------------

FLAG_KEYS = {"--data": "train.data", "--init": "train.init_from", "--name": "run.name", "--policy": "ppo.policy",
             "--reward": "ppo.reward", "--prompts": "ppo.prompts", "--workers": "parallel.workers"}


def entrypoint_config(entrypoint: str):
    """The raytrain command of an entrypoint and the Config it resolves to (flags as their config keys)."""
    words = shlex.split(entrypoint)
    assert words[:3] == ["python", "-m", "raytrain"], entrypoint
    preset, overrides = None, []
    for flag, value in zip(words[4:], words[5:], strict=False):
        if flag == "--config":
            preset = value
        elif flag in FLAG_KEYS:
            overrides.append(f"{FLAG_KEYS[flag]}={value}")
    overrides += [w for w in words[4:] if "=" in w and not w.startswith("-")]
    return words[3], load_config(preset, overrides)


def gpus(group_spec: dict) -> int:
    limits = pod(group_spec)["containers"][0]["resources"].get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def target_cluster(job: dict) -> dict:
    """The cluster spec a RayJob runs on: its own, or the RayCluster its clusterSelector names."""
    if "rayClusterSpec" in job["spec"]:
        return job["spec"]["rayClusterSpec"]
    (cluster,) = [doc["spec"] for doc in map(validate.load_documents, MANIFESTS) for doc in doc
                  if doc["kind"] == "RayCluster" and doc["metadata"]["name"] == job["spec"]["clusterSelector"][
                      "ray.io/cluster"]]
    return cluster


@pytest.mark.parametrize("path", [p for p in MANIFESTS if "clusterSelector" not in load(f"kuberay/{p.name}")["spec"]],
                         ids=lambda p: p.name)
def test_pods_run_this_ray_on_the_shared_volume_with_gpus_on_workers_only(path):
    doc = load(f"kuberay/{path.name}")  # a RayCluster, or a RayJob with a cluster of its own
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__
    for pod_spec in [pod(head(doc))] + [pod(g) for g in spec["workerGroupSpecs"]]:
        container = pod_spec["containers"][0]
        assert container["image"].startswith(f"rayproject/ray:{ray.__version__}-py311")
        assert {"name": "shared", "mountPath": SHARED} in container["volumeMounts"]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod_spec["volumes"] if v["name"] == "shared"]
        assert claims == ["raytrain-shared"]
    assert gpus(head(doc)) == 0
    assert any(gpus(g) for g in spec["workerGroupSpecs"])
    for g in spec["workerGroupSpecs"]:  # GPU Pods, and only they, run the CUDA image and request what they limit
        container = pod(g)["containers"][0]
        assert (gpus(g) > 0) == container["image"].endswith("-gpu")
        assert container["resources"]["requests"] == container["resources"]["limits"]


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.name.startswith("rayjob-")], ids=lambda p: p.name)
def test_jobs_run_a_raytrain_stage_that_fits_their_cluster(path):
    job = load(f"kuberay/{path.name}")
    assert job["kind"] == "RayJob"
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert "pip" in env or "working_dir" in env  # raytrain reaches every node
    if "rayClusterSpec" in job["spec"]:  # a cluster of its own: deleted after the job
        assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
    command, config = entrypoint_config(job["spec"]["entrypoint"])  # load_config checks every key and value
    assert command in (*STAGES, "tune")
    assert config.run.root.startswith(SHARED + "/")
    for value in (config.train.data, config.train.init_from, config.ppo.policy, config.ppo.reward, config.ppo.prompts):
        assert not value or value.startswith(SHARED + "/")
    # raytrain checks at start that parallel.workers GPUs are there (PPO: its actors' too): count those the
    # cluster starts with.
    need = config.parallel.workers
    if command == "ppo":
        need += (config.ppo.rollout_actors + config.ppo.reward_actors) * config.ppo.actor_gpus
    have = sum(gpus(g) * g.get("minReplicas", 0) for g in target_cluster(job)["workerGroupSpecs"])
    assert need <= have, f"{path.name}: needs {need} GPUs, its cluster starts with {have}"


def test_worker_bounds_may_be_left_to_the_crd_defaults():
    job = load("kuberay/rayjob-sft.yaml")  # autoscaling off: the operator sees minReplicas 0, maxReplicas 2^31-1
    del group(job)["minReplicas"], group(job)["maxReplicas"]
    assert validate.manifest_errors(job) == []


# ---- the command line ---------------------------------------------------------------------------------------


def test_cli_prints_one_line_per_file_and_fails_on_any_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    job = load("kuberay/rayjob-pretrain.yaml")
    job["spec"]["rayClusterSpecc"] = job["spec"].pop("rayClusterSpec")
    bad.write_text(yaml.safe_dump(job))
    good = [str(CLUSTER / "kuberay" / "raycluster.yaml"), str(CLUSTER / "aws.yaml")]
    assert validate.main(good) == 0
    assert capsys.readouterr().out.splitlines() == [f"{path}: OK" for path in good]

    assert validate.main([*good, str(bad)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[:2] == [f"{path}: OK" for path in good]
    assert lines[2].startswith(f"{bad}: ERROR ") and "spec.rayClusterSpecc: unknown field" in lines[2]
