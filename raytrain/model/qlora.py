"""QLoRA's frozen base in int8 (`train.lora.quantize=int8`): weight-only, symmetric, one scale per output row.

Once a LoRA run's base is loaded (in its layout: a rank's FSDP or TP shard), each adapted layer's weight is replaced
by int8 values round(W / s) with s = max|W_row| / 127, the row's scale taken over the whole row (a max over the TP
ranks that split it), so every layout holds the same values; the scales (4 bytes a row) are kept whole on every
rank. The int8 weight stays a frozen parameter, so FSDP2 shards and gathers it as before (a frozen parameter may
have its own dtype) and checkpoints leave it out as they leave out every frozen weight. A forward dequantizes the
layer's weight, multiplies, and drops it; the backward dequantizes it again rather than keeping it (int8_linear), so
the dense weights never outlive their layer's use.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

INT8_MAX = 127


def local_rows(weight: torch.Tensor) -> tuple[slice, torch.Tensor]:
    """(the rows of the whole weight this rank holds, its local tensor): all of them, or a DTensor's shard."""
    if not isinstance(weight, DTensor):
        return slice(0, weight.shape[0]), weight
    (chunk,) = weight.__create_chunk_list__()
    return slice(chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0]), weight.to_local()


def _like(weight: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A local tensor placed as `weight` is (a DTensor's shard), or itself."""
    if not isinstance(weight, DTensor):
        return local
    return DTensor.from_local(local, weight.device_mesh, weight.placements, shape=weight.shape,
                              stride=weight.stride(), run_check=False)


@torch.no_grad()
def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values placed as the weight is, the whole weight's per-row scales [out] in float32). A collective when
    the weight is a DTensor: every rank quantizes the same layers in the same order."""
    absmax = weight.detach().abs().amax(dim=1)
    if isinstance(absmax, DTensor):
        absmax = absmax.full_tensor()
    scale = (absmax.float() / INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    rows, local = local_rows(weight)
    values = torch.round(local.float() / scale[rows, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return _like(weight, values), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight of int8 values (placed as they are) and the whole weight's per-row scales."""
    rows, local = local_rows(values)
    return _like(values, (local.float() * scale[rows, None]).to(dtype))


class Int8Linear(torch.autograd.Function):
    """x · dequantize(W)ᵀ + b, the dense weight made again in the backward instead of saved (the int8 weight and the
    scales are what is kept). The weight and the bias are frozen: only x gets a gradient."""

    @staticmethod
    def forward(ctx, x, values, scale, bias):
        ctx.save_for_backward(values, scale)
        return F.linear(x, dequantize(values, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        values, scale = ctx.saved_tensors
        return grad @ dequantize(values, scale, grad.dtype), None, None, None


def int8_linear(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    # Under autocast the input's dtype is what the product runs in (bf16), as F.linear would run it.
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    with torch.autocast(x.device.type, enabled=False):
        return Int8Linear.apply(x.to(dtype), values, scale, None if bias is None else bias.to(dtype))


@torch.no_grad()
def quantize_layers(layers: list[nn.Linear]) -> tuple[int, int]:
    """Each layer's weight to int8 in place (a frozen parameter) with its scales beside it (`weight_scale`, a
    buffer outside the state dict); returns the bytes this rank held of those weights before and after."""
    before = after = 0
    for layer in layers:
        values, scale = quantize_weight(layer.weight)
        before += local_rows(layer.weight)[1].nbytes
        layer.weight = nn.Parameter(values, requires_grad=False)
        layer.register_buffer("weight_scale", scale, persistent=False)
        after += local_rows(values)[1].nbytes + scale.nbytes
    return before, after
