"""The timed training step the benchmarks share (torch only: it also runs where Ray is not installed)."""

from __future__ import annotations

import statistics
import time

import torch

from raytrain.train.objectives import causal_lm, token_loss
from raytrain.train.optim import build_optimizer

WARMUP = 5


def step_rate(model: torch.nn.Module, batches: list[torch.Tensor], logits_of, config) -> float:
    """Tokens/s of forward + backward + clipping + AdamW, the median over the steps after WARMUP."""
    optimizer = build_optimizer(model, config.train)
    tokens = batches[0][:, :-1].numel()
    cuda = batches[0].is_cuda
    times = []
    for i, rows in enumerate(batches):
        start = time.perf_counter()
        inputs, targets = causal_lm(rows)
        loss, count = token_loss(logits_of(model, inputs), targets)
        (loss / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    return tokens / statistics.median(times)
