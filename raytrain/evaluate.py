"""Validation loss and perplexity on a prepared dataset's val split."""

from __future__ import annotations

import math

import torch

from raytrain.data.manifest import PreparedDataset
from raytrain.data.stream import BatchOrder, stream_batches
from raytrain.train.objectives import Objective, token_loss


@torch.no_grad()
def validation_sums(module: torch.nn.Module, dataset: PreparedDataset, objective: Objective, *,
                    batches: int, global_batch: int, consumer: int, num_consumers: int,
                    device: torch.device, autocast) -> torch.Tensor:
    """[loss sum, target count] of this consumer's share of the first `batches` val batches."""
    order = BatchOrder(dataset.split("val").num_rows, global_batch, seed=0, shuffle=False)
    local = order.local_batch(num_consumers)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    module.eval()
    for step, rows in stream_batches(dataset, order, split="val", consumer=consumer,
                                     num_consumers=num_consumers, num_steps=batches):
        inputs, targets = objective(torch.from_numpy(rows).long().to(device), step, consumer * local)
        with autocast():
            loss, count = token_loss(module(inputs, causal=objective.causal), targets)
        totals += torch.stack([loss.double(), count.double()])
    module.train()
    return totals


def loss_and_perplexity(totals: torch.Tensor) -> dict[str, float]:
    loss = float(totals[0] / totals[1].clamp(min=1))
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
