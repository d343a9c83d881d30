"""Peak tensor memory on CPU, where no allocator keeps statistics (on CUDA: max_memory_allocated).

A TorchDispatchMode sees every tensor an op returns. Each storage it has not seen is counted
until Python frees it (a weak reference's callback), so `peak` is the most tensor bytes alive
at once while the mode was on: the figure `raytrain plan` estimates. Tensors made outside the
mode (parameters, gradients, restored optimizer state) join through track(). Storages resized
in place keep the size first seen (FSDP2 frees gathered parameters that way: approximate there).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class TensorMemory(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self._counted = WeakIdKeyDictionary()  # storage → its weak reference (which carries the callback)
        self.current = 0
        self.peak = 0

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            self._count(tensor)

    def _count(self, tensor: torch.Tensor) -> None:
        for storage in get_untyped_storages(tensor):
            if storage in self._counted or storage.device.type == "meta":
                continue
            size = storage.nbytes()
            self._counted[storage] = weakref.ref(storage, lambda _, size=size: self._free(size))
            self.current += size
        self.peak = max(self.peak, self.current)

    def _free(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor run its local ops, which come back here
        result = func(*args, **(kwargs or {}))
        for value in tree_flatten(result)[0]:
            if isinstance(value, torch.Tensor):
                self._count(value)
        return result


def training_tensors(modules: Iterable[torch.nn.Module], optimizers: Iterable[torch.optim.Optimizer]):
    """The tensors that outlive a step: parameters, buffers, gradients and optimizer state."""
    for module in modules:
        yield from module.parameters()
        yield from module.buffers()
        yield from (p.grad for p in module.parameters() if p.grad is not None)
    for optimizer in optimizers:
        for state in optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def host_rss_gib() -> float:
    """The process's resident set now (Linux's /proc)."""
    return _status_kib("VmRSS") / 2**20


def host_peak_rss_gib() -> float:
    """The most the process has held resident: its memory's high-water mark (VmHWM). Not getrusage's ru_maxrss,
    which Linux carries across exec, so a process started by a bigger one (mp.spawn's) would report its parent's
    peak."""
    return _status_kib("VmHWM") / 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")
