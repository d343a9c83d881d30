"""Data parallelism from outside the model: FSDP2 (sharded) or DDP (replicated)."""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from raytrain.model.transformer import Transformer


def apply_data_parallel(model: Transformer, strategy: str, world: int, device: torch.device, bf16: bool,
                        compile_blocks: bool = False) -> torch.nn.Module:
    """Wrap for the current process group; returns the module to call (the model stays reachable)."""
    if compile_blocks:
        # Per block, before sharding (torchtitan's order): one compiled graph reused by every layer.
        for block in model.layers.values():
            block.compile()
    if world == 1:
        return model  # nothing to shard or synchronise; checkpoints still load under any layout
    if strategy == "fsdp":
        # bf16 compute with fp32 gradient reduction on GPU; CPU keeps fp32 and uses autocast.
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if bf16 and device.type == "cuda" else MixedPrecisionPolicy())
        for block in model.layers.values():
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(module: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if isinstance(module, DistributedDataParallel) and not enabled:
        return module.no_sync()
    return contextlib.nullcontext()
