"""Connect to Ray, or start a local Ray sized for the machine it runs on."""

from __future__ import annotations

import logging
import os

import ray

from raytrain.config import RuntimeConfig

log = logging.getLogger("raytrain")


def local_num_cpus(config: RuntimeConfig) -> int:
    # More logical CPUs than cores: Ray Data tasks must find room beside busy workers.
    return config.num_cpus or max(4, 2 * (os.cpu_count() or 1))


def init_ray(config: RuntimeConfig) -> None:
    """Start or join Ray once per process; later calls reuse the connection."""
    if ray.is_initialized():
        configure_ray_data(config)
        return
    level = getattr(logging, config.log_level.upper())
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, logging_level=level, log_to_driver=True)
    else:
        ray.init(
            num_cpus=local_num_cpus(config),
            object_store_memory=int(config.object_store_gib * 2**30),
            include_dashboard=False,
            logging_level=level,
            configure_logging=True,
        )
    configure_ray_data(config)


def configure_ray_data(config: RuntimeConfig) -> None:
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = config.progress
    # Deterministic output order: the same input always yields the same shards.
    context.execution_options.preserve_order = True
    # Task errors reach the driver as themselves (a DataError keeps its one-line message);
    # Ray Data's own copies of the stack trace would only repeat what the CLI reports.
    context.raise_original_map_exception = True
    logging.getLogger("ray.data").setLevel(
        logging.INFO if config.progress else getattr(logging, config.log_level.upper())
    )
    for name in ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))
