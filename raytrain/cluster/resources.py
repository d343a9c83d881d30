"""Whether a run's workers (and a stage's actors) fit the cluster; on an autoscaling cluster, after asking the
autoscaler for them and waiting up to runtime.resource_wait_s."""

from __future__ import annotations

import logging
import time

import ray

from raytrain.config import Config
from raytrain.errors import ConfigError

log = logging.getLogger("raytrain")


def check_placement(config: Config, use_gpu: bool, beside: str = "", beside_cpus: float = 0.0) -> None:
    """The workers fit the cluster, beside what else the run places (`beside`: PPO's actor pools); on an
    autoscaling cluster after waiting up to runtime.resource_wait_s for the nodes."""
    parallel = config.parallel
    worker = {"CPU": parallel.cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    bundles = [worker] * parallel.workers + ([{"CPU": beside_cpus}] if beside_cpus else [])
    need = {"CPU": parallel.workers * parallel.cpus_per_worker + beside_cpus,
            "GPU": float(parallel.workers) if use_gpu else 0.0}
    wait_s = config.runtime.resource_wait_s
    have = await_resources(need, bundles, wait_s)
    waited = f" after waiting {wait_s:g}s for the autoscaler" if wait_s else ""
    hint = "" if wait_s else ", or on an autoscaling cluster wait for the nodes with runtime.resource_wait_s=900"
    if need["CPU"] > have.get("CPU", 0):
        raise ConfigError(f"parallel.workers={parallel.workers} × parallel.cpus_per_worker="
                          f"{parallel.cpus_per_worker}{beside} need {need['CPU']:g} CPUs but the cluster has "
                          f"{have.get('CPU', 0):g}{waited}; lower parallel.workers or parallel.cpus_per_worker{hint}")
    if need["GPU"] > have.get("GPU", 0):
        raise ConfigError(f"parallel.workers={parallel.workers} need {parallel.workers} GPUs but the cluster has "
                          f"{have.get('GPU', 0):g}{waited}; lower parallel.workers{hint}")


def await_resources(need: dict[str, float], bundles: list[dict[str, float]], wait_s: float) -> dict[str, float]:
    """The cluster's resources, once they cover `need` or wait_s has passed. While it waits, the bundles are asked
    of the autoscaler (which starts nodes for them; the request is withdrawn after)."""
    have = ray.cluster_resources()
    if wait_s <= 0 or _covers(have, need):
        return have
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)
    started, next_note = time.monotonic(), 0.0
    try:
        while not _covers(have, need) and (waited := time.monotonic() - started) < wait_s:
            if waited >= next_note:
                log.info("waiting for %s (the cluster has %s): %.0fs of runtime.resource_wait_s=%g", _amounts(need),
                         _amounts(have), waited, wait_s)
                next_note += 30.0
            time.sleep(1.0)
            have = ray.cluster_resources()
    finally:
        request_resources(bundles=[])
    return have


def _covers(have: dict[str, float], need: dict[str, float]) -> bool:
    return all(have.get(kind, 0.0) >= amount for kind, amount in need.items())


def _amounts(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(kind, 0.0):g} {kind}" for kind in ("CPU", "GPU"))


def use_gpus(config: Config) -> bool:
    if config.parallel.use_gpu is not None:
        return config.parallel.use_gpu
    return ray.cluster_resources().get("GPU", 0) >= config.parallel.workers
