"""Models built on the meta device and given memory only for what each rank holds.

A worker builds its model parts on `meta` (no memory), applies the layout (TP, AC, compile, FSDP2: shapes and
placements only), then allocates its own shards on its device (`to_empty`) and fills them: with the seeded
initial values (drawn a block of rows at a time on the host, of which the rank keeps its slice, so values do
not depend on the layout), then with a checkpoint's where a run starts from one. No rank ever holds the whole model.
"""

from __future__ import annotations

import itertools

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.tensor import DTensor

from raytrain.model.lora import lora_initial_values
from raytrain.model.transformer import Transformer, initial_values


def is_meta(module: torch.nn.Module) -> bool:
    return any(param.is_meta for param in module.parameters())


@torch.no_grad()
def materialize(part: Transformer, device: torch.device, seed: int) -> None:
    """Allocate this rank's shards of a part built on the meta device and give them their seeded values (its LoRA
    adapters' too, if any)."""
    part.to_empty(device=device)
    part.reset_rotary(device)
    # Activation checkpointing wraps blocks; the wrapper's prefix is not part of a parameter's name.
    local = {name.replace(_CHECKPOINT_PREFIX, ""): param for name, param in part.named_parameters()}
    # One block of values at a time (chained generators: a tuple would hold them all).
    for name, first, values in itertools.chain(initial_values(part.config, part.head, seed),
                                               lora_initial_values(part, seed)):
        param = local.get(name)
        if param is not None:  # else another pipeline stage's
            copy_rows(param, first, values)


def local_slices(param: torch.Tensor) -> tuple[tuple[slice, ...], torch.Tensor]:
    """Which slice of the whole tensor this rank holds of a parameter (all of it, or a DTensor's shard), and the
    local tensor that holds it."""
    if not isinstance(param, DTensor):
        return tuple(slice(0, size) for size in param.shape), param
    (chunk,) = param.__create_chunk_list__()  # the local shard's offsets and sizes, as DCP reads them
    return tuple(slice(start, start + size) for start, size in zip(chunk.offsets, chunk.sizes, strict=True)), \
        param.to_local()


def copy_rows(param: torch.Tensor, first: int, values: torch.Tensor) -> None:
    """Copy rows first… of a whole tensor into a parameter that may hold only a shard of it (a DTensor): what
    the shard holds of those rows is cut on the host, so the device receives only that."""
    (rows, *columns), local = local_slices(param)
    low, high = max(first, rows.start), min(first + len(values), rows.stop)
    if low < high:
        local[low - rows.start : high - rows.start].copy_(values[(slice(low - first, high - first), *columns)])
