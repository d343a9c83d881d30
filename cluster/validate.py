"""Offline checks of cluster definitions: Ray cluster launcher YAMLs and KubeRay `ray.io/v1` manifests.

    python -m cluster.validate cluster/aws.yaml cluster/gcp.yaml cluster/kuberay/*.yaml

prints one line per file, `FILE: OK` or `FILE: ERROR <what>; <what>…`, and exits 1 if any file fails. Nothing is
contacted:

- a launcher YAML (it has `provider`) goes through what `ray up` runs before it talks to the cloud: Ray's own
  `prepare_config` (defaults merged) and `validate_config` (ray/autoscaler/ray-schema.json and its checks);
- a RayCluster or RayJob goes through the CRD schema of KubeRay v1.7.0 (kuberay/schema/), made strict so that a
  misspelt field fails, then through the operator's own cross-field rules, which no schema holds.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import functools
import gzip
import json
import logging
import re
import sys
from pathlib import Path

import yaml

KUBERAY_RELEASE = "v1.7.0"
SCHEMA_FILE = Path(__file__).parent / "kuberay" / "schema" / f"kuberay-{KUBERAY_RELEASE}.json.gz"
API_VERSION = "ray.io/v1"
KINDS = ("RayCluster", "RayJob")

# Constants of ray-operator/controllers/ray/utils/constant.go at v1.7.0.
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 53 - 6}  # MaxRayClusterNameLength, MaxRayJobNameLength
CLUSTER_SELECTOR_KEY = "ray.io/cluster"  # RayJobClusterSelectorKey
AUTOSCALER_V2_ENV = "RAY_enable_autoscaler_v2"  # RAY_ENABLE_AUTOSCALER_V2
RESOURCE_START_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")  # validateRayGroupResources
MAX_INT32 = 2**31 - 1  # the CRD's default maxReplicas

# k8s.io/apimachinery/pkg/util/validation: IsDNS1035Label, IsQualifiedName, IsValidLabelValue.
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")

# The top-level metadata is a bare `type: object` in a CRD (the API server checks ObjectMeta itself): the fields a
# manifest sets, and no others, so that `lables:` fails too.
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
}


# ---- files --------------------------------------------------------------------------------------------------


def load_documents(path: str | Path) -> list:
    """The YAML documents of a file (a manifest file may hold several), empty ones left out."""
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def check_file(path: str | Path) -> list[str]:
    """Every problem of every document in the file; empty when it is valid."""
    try:
        docs = load_documents(path)
    except (OSError, yaml.YAMLError) as e:
        return [f"cannot read: {e}"]
    if not docs:
        return ["no YAML document in the file"]
    errors = []
    for i, doc in enumerate(docs, 1):
        where = f"document {i}: " if len(docs) > 1 else ""
        errors += [where + error for error in check_document(doc)]
    return errors


def check_document(doc) -> list[str]:
    if not isinstance(doc, dict):
        return ["not a YAML mapping"]
    if "apiVersion" in doc or "kind" in doc:
        return manifest_errors(doc)
    if "provider" in doc:
        return launcher_errors(doc)
    return ["neither a Ray cluster launcher config (no 'provider') nor a Kubernetes manifest (no 'apiVersion')"]


# ---- Ray cluster launcher -----------------------------------------------------------------------------------


def launcher_errors(config: dict) -> list[str]:
    """What `ray up` checks before its provider's bootstrap, which needs the cloud (AWS looks up instance types
    to fill in `resources`; GCP sets up project, IAM, ssh key and subnet). So every node type must state its
    `resources`: the schema requires them and nothing offline fills them in."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    quiet = logging.getLogger("ray.autoscaler._private.util")  # its INFO lines about max_workers defaults
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except jsonschema.ValidationError as e:
        return [schema_message(e)]
    except Exception as e:  # prepare_config's KeyError/AssertionError, validate_config's ValueError
        return [f"{type(e).__name__}: {e}"]
    finally:
        quiet.setLevel(level)
    return []


# ---- KubeRay: schema ----------------------------------------------------------------------------------------


def tighten(schema: dict) -> dict:
    """Make a CRD's openAPIV3Schema strict, in place, as the API server sees it:

    - `additionalProperties: false` on every object schema with `properties` and neither `additionalProperties`
      nor `x-kubernetes-preserve-unknown-fields` (KubeRay's scripts/openapi2jsonschema.py; kubectl's strict field
      validation rejects unknown fields the same way), so a misspelt field fails;
    - a field with a `default` leaves `required`: the API server fills defaults in before it validates.
    """
    if not isinstance(schema, dict):
        return schema
    properties = schema.get("properties")
    if properties is not None:
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        if "required" in schema:
            schema["required"] = [name for name in schema["required"] if "default" not in properties.get(name, {})]
        for sub in properties.values():
            tighten(sub)
    for key in ("items", "additionalProperties", "not"):
        tighten(schema.get(key))
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key, ()):
            tighten(sub)
    return schema


@functools.cache
def _validator(kind: str):
    import jsonschema

    schema = tighten(json.loads(gzip.decompress(SCHEMA_FILE.read_bytes()))[kind])
    schema["properties"]["metadata"] = OBJECT_META
    return jsonschema.Draft7Validator(schema)


def schema_message(error) -> str:
    """One line for a jsonschema error, naming the field; an unknown field gets the closest known name."""
    path = _dotted(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties" and error.validator_value is False and "properties" in schema \
            and "patternProperties" not in schema and isinstance(error.instance, dict):
        known = list(schema["properties"])
        problems = []
        for name in error.instance:
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                problems.append(f"{_dotted([*error.absolute_path, name])}: unknown field{hint}")
        if problems:
            return "; ".join(problems)
    message = error.message if len(error.message) <= 300 else error.message[:300] + "…"
    return f"{path or '(top level)'}: {message}"


def _dotted(path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][-\w]*", str(part)):
            out += f".{part}" if out else str(part)
        else:  # keys such as nvidia.com/gpu or ray.io/cluster
            out += f"[{part!r}]"
    return out


def manifest_errors(doc: dict) -> list[str]:
    """Schema errors of a RayCluster/RayJob, or, when there are none, the operator's rules it breaks."""
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if api_version != API_VERSION or kind not in KINDS:
        return [f"apiVersion {api_version!r}, kind {kind!r}: only {API_VERSION} {' and '.join(KINDS)} are checked"]
    errors = sorted(_validator(kind).iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        return [schema_message(e) for e in errors]
    return operator_errors(doc)  # they assume a well-formed object


# ---- KubeRay: the operator's rules --------------------------------------------------------------------------
# Each from ray-operator/controllers/ray/utils/validation.go (ValidateRay{Cluster,Job}{Metadata,Spec}) or
# ray-operator/pkg/webhooks/v1/ at v1.7.0, unless marked "ours". The object is taken as the API server
# stores it: the CRD's defaults (minReplicas 0, maxReplicas 2^31-1) fill in what the manifest leaves out.


def operator_errors(doc: dict) -> list[str]:
    kind, metadata, spec = doc["kind"], doc["metadata"], doc.get("spec") or {}
    errors = name_errors(kind, metadata["name"])
    errors += label_errors("metadata.labels", metadata.get("labels") or {})  # the API server's ObjectMeta rule
    if kind == "RayCluster":
        errors += cluster_spec_errors(spec, "spec")
    else:
        errors += job_spec_errors(spec)
    return errors


def name_errors(kind: str, name: str) -> list[str]:
    if len(name) > MAX_NAME_LENGTH[kind]:
        return [f"metadata.name: '{name}' is longer than {MAX_NAME_LENGTH[kind]} characters, the most a {kind} "
                "may have (its Pods' and Services' names are derived from it)"]
    if len(name) > 63 or not DNS1035_LABEL.fullmatch(name):
        return [f"metadata.name: '{name}' is not a DNS-1035 label (lower-case letters, digits and '-', starting "
                "with a letter, ending with a letter or digit)"]
    return []


def label_errors(where: str, labels: dict) -> list[str]:
    """IsQualifiedName for keys, IsValidLabelValue for values (validateRayGroupLabels)."""
    errors = []
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if (prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.fullmatch(prefix))) or len(name) > 63 \
                or not LABEL_NAME.fullmatch(name):
            errors.append(f"{where}: '{key}' is not a valid label key")
        if len(value) > 63 or (value and not LABEL_NAME.fullmatch(value)):
            errors.append(f"{where}['{key}']: '{value}' is not a valid label value")
    return errors


def _ray_container(group: dict) -> dict:
    """The Ray container: the first of the Pod template (RayContainerIndex = 0)."""
    containers = group.get("template", {}).get("spec", {}).get("containers") or [{}]
    return containers[0]


def _env(container: dict) -> dict:
    return {var["name"]: var.get("value", "") for var in container.get("env") or []}


def cluster_spec_errors(spec: dict, at: str) -> list[str]:
    """ValidateRayClusterSpec, the webhook's unique group names, and our replicas bound."""
    errors = []
    head = spec.get("headGroupSpec") or {}
    head_env = _env(_ray_container(head))
    autoscaling = spec.get("enableInTreeAutoscaling") is True  # IsAutoscalingEnabled
    options = spec.get("autoscalerOptions") or {}
    v2 = options.get("version") == "v2"  # IsAutoscalingV2Enabled
    v2_by_env = head_env.get(AUTOSCALER_V2_ENV) in ("1", "true")

    if not head.get("template", {}).get("spec", {}).get("containers"):
        errors.append(f"{at}.headGroupSpec.template.spec.containers: the head needs at least one container (the Ray "
                      "container comes first)")
    errors += _group_errors(f"{at}.headGroupSpec", head)

    seen = set()
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        where = f"{at}.workerGroupSpecs[{i}]"
        name = group.get("groupName")
        if name in seen:  # pkg/webhooks/v1/raycluster_webhook.go validateWorkerGroups
            errors.append(f"{where}.groupName: '{name}' is used twice; worker group names must be unique")
        seen.add(name)
        if not group.get("template", {}).get("spec", {}).get("containers"):
            errors.append(f"{where}.template.spec.containers: a worker group needs at least one container")
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", MAX_INT32)
        if low < 0 or high < 0:
            errors.append(f"{where}: minReplicas {low} and maxReplicas {high} must not be negative")
        elif low > high:
            errors.append(f"{where}: minReplicas {low} is greater than maxReplicas {high}")
        elif "replicas" in group and not low <= group["replicas"] <= high:
            # Ours: the operator silently clamps replicas into [minReplicas, maxReplicas] (utils/util.go
            # GetWorkerGroupDesiredReplicas), so the manifest would not say how many Pods run.
            errors.append(f"{where}.replicas: {group['replicas']} is outside [minReplicas {low}, maxReplicas {high}]"
                          "; the operator would clamp it")
        errors += _group_errors(where, group)
        idle = group.get("idleTimeoutSeconds")
        if idle is not None and idle < 0:
            errors.append(f"{where}.idleTimeoutSeconds: must not be negative")
        elif idle is not None and not (v2 or v2_by_env):
            errors.append(f"{where}.idleTimeoutSeconds: needs autoscaler v2 ({at}.autoscalerOptions.version: v2)")
        if autoscaling and group.get("suspend"):
            errors.append(f"{where}.suspend: a worker group cannot be suspended with enableInTreeAutoscaling")
        if autoscaling and v2 and group.get("template", {}).get("spec", {}).get("restartPolicy", "Never") != "Never":
            errors.append(f"{where}.template.spec.restartPolicy: must be Never or unset with autoscaler v2")

    if not autoscaling and v2_by_env:
        errors.append(f"{at}.headGroupSpec: env {AUTOSCALER_V2_ENV} turns autoscaler v2 on but "
                      "enableInTreeAutoscaling is not true")
    if autoscaling and "version" in options and AUTOSCALER_V2_ENV in head_env:
        errors.append(f"{at}: both autoscalerOptions.version and the head's env {AUTOSCALER_V2_ENV} are set; use "
                      "only autoscalerOptions.version")
    if autoscaling and v2 and head.get("template", {}).get("spec", {}).get("restartPolicy", "Never") != "Never":
        errors.append(f"{at}.headGroupSpec.template.spec.restartPolicy: must be Never or unset with autoscaler v2")
    if options.get("idleTimeoutSeconds", 0) < 0:
        errors.append(f"{at}.autoscalerOptions.idleTimeoutSeconds: must not be negative")
    return errors


def _group_errors(where: str, group: dict) -> list[str]:
    """validateRayGroupResources and validateRayGroupLabels."""
    errors = []
    params = group.get("rayStartParams") or {}
    in_params = [key for key in RESOURCE_START_PARAMS if params.get(key)]
    if in_params and group.get("resources"):
        errors.append(f"{where}: resources set both in rayStartParams ({', '.join(in_params)}) and in resources; "
                      "use only one")
    if "labels" in params:
        errors.append(f"{where}.rayStartParams.labels: not supported; use {where}.labels")
    return errors + label_errors(f"{where}.labels", group.get("labels") or {})


def job_spec_errors(spec: dict) -> list[str]:
    """ValidateRayJobSpec (with validateDeletionConfiguration), and the cluster spec it brings."""
    errors = []
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    selector = spec.get("clusterSelector") or {}
    mode = spec.get("submissionMode", "K8sJobMode")
    backoff = spec.get("backoffLimit")

    if spec.get("suspend") and not shutdown:
        errors.append("spec.suspend: a RayJob can be suspended only with shutdownAfterJobFinishes: true")
    if ttl < 0:
        errors.append("spec.ttlSecondsAfterFinished: must not be negative")
    elif ttl > 0 and not shutdown:
        errors.append(f"spec.ttlSecondsAfterFinished: {ttl} needs shutdownAfterJobFinishes: true (without it nothing "
                      "is deleted)")
    if (spec.get("deletionStrategy") or {}).get("deletionRules") and shutdown:
        errors.append("spec.deletionStrategy.deletionRules: cannot be used with shutdownAfterJobFinishes: true")

    # The operator requires one of the two; with both it silently ignores rayClusterSpec (ours: exactly one).
    if "rayClusterSpec" not in spec and not selector:
        errors.append("spec: set rayClusterSpec (a cluster for this job) or clusterSelector (an existing cluster)")
    elif "rayClusterSpec" in spec and selector:
        errors.append("spec: rayClusterSpec and clusterSelector are both set; the operator would ignore "
                      "rayClusterSpec and use the selected cluster; keep one")
    if selector:
        if not selector.get(CLUSTER_SELECTOR_KEY):
            errors.append(f"spec.clusterSelector: needs a non-empty '{CLUSTER_SELECTOR_KEY}' (the RayCluster's name)")
        if spec.get("suspend"):
            errors.append("spec.suspend: not supported with clusterSelector")
        if mode == "SidecarMode":
            errors.append("spec.clusterSelector: not supported in SidecarMode")
        if backoff and backoff > 0:
            errors.append("spec.backoffLimit: must be 0 with clusterSelector")
    if mode == "InteractiveMode" and backoff and backoff > 0:
        errors.append("spec.backoffLimit: must be 0 in InteractiveMode")
    if mode == "SidecarMode":
        for key in ("submitterPodTemplate", "submitterConfig"):
            if key in spec:
                errors.append(f"spec.{key}: not supported in SidecarMode")
        head_pod = (spec.get("rayClusterSpec") or {}).get("headGroupSpec", {}).get("template", {}).get("spec", {})
        if head_pod.get("restartPolicy", "Never") != "Never":
            errors.append("spec.rayClusterSpec.headGroupSpec.template.spec.restartPolicy: must be Never or unset "
                          "in SidecarMode")

    if "rayClusterSpec" in spec:
        errors += cluster_spec_errors(spec["rayClusterSpec"], "spec.rayClusterSpec")
    errors += runtime_env_errors(spec.get("runtimeEnvYAML", ""))
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if key in spec and spec[key] <= 0:
            errors.append(f"spec.{key}: must be positive")
    if backoff is not None and backoff < 0:
        errors.append("spec.backoffLimit: must not be negative")
    return errors


def runtime_env_errors(text: str) -> list[str]:
    """The operator only parses runtimeEnvYAML into a map; Ray's own RuntimeEnv then checks the fields it knows
    (ours), and an unknown top-level field, which Ray would take for a plugin's name, is an error (ours)."""
    try:
        env = yaml.safe_load(text) if text else None
    except yaml.YAMLError as e:
        return [f"spec.runtimeEnvYAML: not valid YAML: {' '.join(str(e).split())}"]
    if env is None:
        return []
    if not isinstance(env, dict):
        return ["spec.runtimeEnvYAML: must be a YAML mapping of runtime_env fields"]
    from ray.runtime_env import RuntimeEnv

    known = sorted(RuntimeEnv.known_fields)
    errors = []
    for key in env:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            errors.append(f"spec.runtimeEnvYAML.{key}: unknown runtime_env field{hint}")
    if not errors:
        try:
            RuntimeEnv(**env)
        except Exception as e:
            errors.append(f"spec.runtimeEnvYAML: {e}")
    return errors


# ---- command line -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", metavar="FILE", help="launcher YAMLs and KubeRay manifests")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.files:
        errors = check_file(path)
        failed += bool(errors)
        print(f"{path}: OK" if not errors else f"{path}: ERROR " + "; ".join(" ".join(e.split()) for e in errors))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
