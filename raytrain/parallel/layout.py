"""Apply a parallel layout to the model, in torchtitan's order: pipeline split → TP → AC → compile → FSDP2.

One DeviceMesh per worker with dims (pp, dp_replicate, dp_shard, tp): pp outermost, tp
innermost, so on a real cluster the tensor-parallel group (the chattiest) stays inside a node.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from raytrain.config import ParallelConfig
from raytrain.model.transformer import Transformer
from raytrain.parallel.tensor_parallel import apply_tensor_parallel

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class Layout:
    """This worker's place in the mesh."""

    mesh: DeviceMesh | None  # None for a single worker
    dp_rank: int  # which slice of each global batch this worker reads
    dp: int
    tp: int
    pp: int
    pp_rank: int

    @property
    def pp_group(self):
        return self.mesh["pp"].get_group() if self.pp > 1 else None


def build_layout(parallel: ParallelConfig, world: int, device: torch.device) -> Layout:
    if world == 1:
        return Layout(None, 0, 1, 1, 1, 0)
    shape = (parallel.pp, parallel.dp_replicate, parallel.shard, parallel.tp)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=MESH_DIMS)
    dp_rank = mesh["dp_replicate"].get_local_rank() * parallel.shard + mesh["dp_shard"].get_local_rank()
    return Layout(mesh, dp_rank, parallel.dp, parallel.tp, parallel.pp, mesh["pp"].get_local_rank())


def plain_ddp(parallel: ParallelConfig) -> bool:
    """Pure replication runs plain DDP over the replicate group; any other data parallelism runs FSDP2."""
    return parallel.shard == 1 and parallel.tp == 1 and parallel.pp == 1


def parallelize(part: Transformer, parallel: ParallelConfig, layout: Layout, device: torch.device,
                bf16: bool, fill: Callable[[Transformer], None] | None = None,
                trainable: bool = True) -> torch.nn.Module:
    """Parallelize one model part (the whole model, or a pipeline stage); returns the module to call.

    fill: for a part built on the meta device, what allocates this rank's shards and gives them values
    (parallel/materialize.py), called once the layout has decided what the rank holds and before DDP, which
    broadcasts values, wraps it. A frozen model (trainable=False) is never wrapped in DDP, which is for gradients."""
    if layout.tp > 1:
        apply_tensor_parallel(part, layout.mesh["tp"], parallel.sequence_parallel, parallel.loss_parallel)
    if parallel.activation_checkpointing == "full":
        for name in list(part.layers):
            if int(name) % parallel.ac_every == 0:
                part.layers[name] = checkpoint_wrapper(part.layers[name])
    if parallel.compile:
        # Per block: one compiled graph that every layer reuses.
        for block in part.layers.values():
            block.compile()
    if layout.dp > 1 and not plain_ddp(parallel):
        _shard(part, parallel, layout, device, bf16)
    if fill is not None:
        fill(part)
    if layout.dp > 1 and plain_ddp(parallel) and trainable:
        group = layout.mesh["dp_replicate"].get_group()
        return DistributedDataParallel(part, process_group=group,
                                       device_ids=[device.index] if device.type == "cuda" else None)
    return part


def _shard(part: Transformer, parallel: ParallelConfig, layout: Layout, device: torch.device, bf16: bool) -> None:
    """FSDP2 over the data-parallel dims (HSDP when both are > 1), composed with TP and PP."""
    dp_mesh = layout.mesh["dp_replicate", "dp_shard"] if parallel.dp_replicate > 1 else layout.mesh["dp_shard"]
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 and device.type == "cuda" else MixedPrecisionPolicy())
    # A pipeline runs each block once per micro-batch: keep its gathered parameters for the whole
    # step instead of all-gathering them again for every micro-batch (torchtitan does the same).
    for block in part.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=layout.pp == 1)
    fully_shard(part, mesh=dp_mesh, mp_policy=policy)


def gradient_sync(module: torch.nn.Module, enabled: bool):
    """Skip the gradient reduction on all but the last micro-batch of a step."""
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if isinstance(module, DistributedDataParallel) and not enabled:
        return module.no_sync()
    return contextlib.nullcontext()
