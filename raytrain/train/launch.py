"""Running the loop on Ray Train workers: the TorchTrainer of a stage's run, its workers' context, summary.json."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raytrain import storage
from raytrain.cluster.resources import use_gpus
from raytrain.config import Config, config_from_dict
from raytrain.runtime import configure_ray_data, configure_worker_logging
from raytrain.train.checkpoint import CHECKPOINTS_DIR
from raytrain.train.loop import Worker, WorkerContext
from raytrain.train.metrics import write_summary

log = logging.getLogger("raytrain")
CONTROLLER_FAILURE_LIMIT = 3


def train_worker(loop_config: dict) -> None:
    """Each Ray Train worker: the stage's loop, with Ray Train's rank, device and checkpoint reports."""
    config = config_from_dict(loop_config["config"])
    configure_worker_logging(config.runtime)
    configure_ray_data(dataclasses.replace(config.runtime, progress=False))
    Worker(config, loop_config["run_dir"], loop_config["stage"], ray_train_context(),
           loop_config.get("extras")).run()


def ray_train_context() -> WorkerContext:
    context = ray.train.get_context()
    return WorkerContext(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(),
                         ray_data=True, publish=_report_checkpoint)


def _report_checkpoint(folder: Path, step: int, metrics: dict) -> None:
    """Ray Train takes each rank's files of the checkpoint into the run folder (the report is a barrier)."""
    ray.train.report({"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                     checkpoint_dir_name=f"step_{step:06d}")


def fit(config: Config, stage, work: str, callbacks: tuple = (), extras: dict | None = None) -> dict:
    """Run the stage's loop on the Ray Train workers of config.parallel into the run folder; write summary.json.
    `extras`: what the stage's hooks need beside the config (PPO: its actor pools)."""
    run_dir = config.run.location  # a path or a URI: Ray Train writes checkpoints to either
    config.save(storage.join(run_dir, "config.yaml"))
    parallel = config.parallel
    log.info("%s: %d worker(s) (pp %d × dp_replicate %d × dp_shard %d × tp %d), %s → %s",
             stage.name, parallel.workers, parallel.pp, parallel.dp_replicate, parallel.shard,
             parallel.tp, work, run_dir)
    use_gpu = use_gpus(config)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.to_dict(), "run_dir": run_dir, "stage": stage, "extras": extras},
        scaling_config=ScalingConfig(num_workers=config.parallel.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.parallel.cpus_per_worker},
                                     placement_strategy=config.parallel.placement_strategy),
        run_config=RunConfig(
            name=CHECKPOINTS_DIR,
            storage_path=run_dir,
            # A controller that cannot start its workers (their resources taken) gives up instead of retrying
            # forever: a sweep's trial then fails rather than hangs.
            failure_config=FailureConfig(max_failures=config.train.max_failures,
                                         controller_failure_limit=CONTROLLER_FAILURE_LIMIT),
            callbacks=list(callbacks),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            # Ray Train's own lines (worker group started, every report and checkpoint) at runtime.log_level.
            logging_config=LoggingConfig(log_level=config.runtime.log_level.upper()),
        ),
    )
    started = time.perf_counter()
    result = trainer.fit()
    # The checkpoint's place named as the run folder is (Ray's own path drops a URI's scheme).
    checkpoint = storage.join(run_dir, CHECKPOINTS_DIR, result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1]) \
        if result.checkpoint else None
    return write_summary(run_dir, checkpoint, time.perf_counter() - started)
