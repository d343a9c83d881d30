"""The loop without Ray Train: in this process (tests, benchmarks, a laptop without Ray), or one process per rank
under `torchrun` (raytrain/torchrun.py).

Batches are read in-process (the same rows Ray Data streams), and each rank copies its checkpoint files into the
run folder (a shared folder under torchrun); rank 0 writes raytrain.json and keeps train.keep_checkpoints.
Stages whose hooks need Ray (PPO's actor pools) run through their command.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from raytrain import storage
from raytrain.config import Config
from raytrain.errors import ConfigError
from raytrain.train.checkpoint import CHECKPOINTS_DIR, latest_checkpoint
from raytrain.train.loop import Worker, WorkerContext
from raytrain.train.metrics import write_summary


def local_context(run_dir: str, keep: int, use_gpu: bool | None = None) -> WorkerContext:
    """rank and world from torchrun's environment (a process group is started), else one process; on this
    process's GPU (LOCAL_RANK's) when use_gpu says so, or when use_gpu is None and torch sees one, else the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if use_gpu is None else use_gpu
    if cuda and not torch.cuda.is_available():
        raise ConfigError("config key 'parallel.use_gpu' is true but torch sees no CUDA device here; set "
                          "parallel.use_gpu=false (or leave it unset) to train on the CPU")
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0

    def publish(folder: Path, step: int, metrics: dict) -> None:
        checkpoints = storage.join(run_dir, CHECKPOINTS_DIR)
        storage.copy_tree(folder, storage.join(checkpoints, f"step_{step:06d}"))
        if world > 1:
            dist.barrier()
        if rank == 0:  # names sort by step: keep the newest
            steps = sorted({name.partition("/")[0] for name in storage.list_files(checkpoints)})
            for old in steps[:-keep]:
                storage.delete(storage.join(checkpoints, old))

    return WorkerContext(rank, world, device, ray_data=False, publish=publish)


def run_local(config: Config, stage) -> dict:
    """The stage's loop in this process (or this torchrun rank) into the run folder; summary.json from rank 0."""
    if not stage.in_process:
        raise ConfigError(f"`raytrain {stage.name}` needs Ray (its rollout and reward actors); run it with the "
                          "command")
    resolved = stage.preflight(config)
    run_dir = resolved.run.location
    context = local_context(run_dir, resolved.train.keep_checkpoints, resolved.parallel.use_gpu)
    if context.rank == 0:
        resolved.save(storage.join(run_dir, "config.yaml"))
    started, threads = time.perf_counter(), torch.get_num_threads()
    try:
        Worker(resolved, run_dir, stage, context).run()
    finally:
        torch.set_num_threads(threads)  # the worker sets its own (parallel.cpus_per_worker); the caller keeps its
    if context.rank != 0:
        return {}
    return write_summary(run_dir, latest_checkpoint(run_dir), time.perf_counter() - started)
