"""The timed training step the benchmarks share (torch only): forward, backward, clipping and AdamW, as the worker
runs it for one process, applied to our model and to `transformers`' alike."""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from raytrain.train.memory import TensorMemory
from raytrain.train.objectives import causal_lm, token_loss
from raytrain.train.optim import build_optimizer

WARMUP = 3  # steps left out: the first allocations, lazily made optimizer state, compilation


def train_steps(model: torch.nn.Module, batches: list[torch.Tensor], logits_of, config) -> list[tuple[float, float]]:
    """(seconds of the whole step, of its forward + loss + backward) for each step after WARMUP; the rest of a step
    (clipping, AdamW) is the same code for any model."""
    optimizer = build_optimizer(model, config.train)
    times = []
    for i, rows in enumerate(batches):
        start = time.perf_counter()
        inputs, targets = causal_lm(rows)
        loss, count = token_loss(logits_of(model, inputs), targets)
        (loss / count).backward()
        if rows.is_cuda:
            torch.cuda.synchronize()
        model_done = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rows.is_cuda:
            torch.cuda.synchronize()
        if i >= WARMUP:
            times.append((time.perf_counter() - start, model_done - start))
    return times


def step_rate(model: torch.nn.Module, batches: list[torch.Tensor], logits_of, config) -> dict[str, float]:
    """tokens/s of the median step after WARMUP; model tokens/s of its forward + backward alone (median)."""
    tokens = batches[0][:, :-1].numel()
    times = train_steps(model, batches, logits_of, config)
    return {"tokens/s": tokens / statistics.median(t for t, _ in times),
            "model tokens/s": tokens / statistics.median(m for _, m in times)}


def tensor_peak_mib(model: torch.nn.Module, batches: list[torch.Tensor], logits_of, config) -> float:
    """The most tensor bytes alive at once over two steps (parameters, gradients, AdamW state, activations), counted
    by the dispatch mode the worker uses for mem/tensor_peak_gib (slow: never inside a timed run)."""
    memory = TensorMemory()
    memory.track(model.parameters())
    with memory:
        train_steps(model, batches[:2], logits_of, config)
    return memory.peak / 2**20


class OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(model: torch.nn.Module, batches: list[torch.Tensor], logits_of, config) -> int:
    """The aten operations one training step dispatches (forward, backward, clipping, AdamW): what a model's Python
    costs beyond its kernels grows with this."""
    counts = []
    for steps in (1, 2):  # the second step's ops: the first also makes AdamW's state
        counter = OpCount()
        with counter:
            train_steps(model, batches[:steps], logits_of, config)
        counts.append(counter.ops)
    return counts[1] - counts[0]
