"""Global gradient-norm clipping when parameters live on different device meshes.

Under FSDP + TP some gradients are DTensors on the (dp, tp) mesh, some on the dp mesh only,
and some plain tensors replicated everywhere; PyTorch's clip_grad_norm_ cannot stack norms
of different meshes. Norms are computed per mesh (one reduction each) and then combined.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float, pp_group=None) -> torch.Tensor:
    """Clip to a global L2 norm; returns the norm before clipping (a plain tensor).

    pp_group: pipeline stages hold disjoint parameters, so their squared norms add up.
    """
    params = [p for p in parameters if p.grad is not None]
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
        groups.setdefault(key, []).append(p.grad)
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    total_square = torch.stack(squares).sum() if squares else torch.zeros(())
    if pp_group is not None:
        dist.all_reduce(total_square, group=pp_group)
    total = total_square.sqrt()
    # A Python float scales a DTensor on any mesh (a tensor coefficient would need the same mesh).
    coefficient = min(1.0, max_norm / (float(total) + 1e-6))
    if coefficient < 1.0:
        for grads in groups.values():
            torch._foreach_mul_(grads, coefficient)
    return total
