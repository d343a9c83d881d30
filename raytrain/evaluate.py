"""Validation loss and perplexity on a prepared dataset's val split."""

from __future__ import annotations

import contextlib
import math

import torch

from raytrain.data.manifest import PreparedDataset
from raytrain.data.stream import BatchOrder, stream_batches
from raytrain.train.objectives import Objective, token_loss


@torch.no_grad()
def validation_sums(dataset: PreparedDataset, objective: Objective, loss_sums, *, batches: int, global_batch: int,
                    consumer: int, num_consumers: int, device: torch.device) -> torch.Tensor:
    """[loss sum, target count] of this consumer's share of the first `batches` val batches.

    loss_sums(inputs, targets) → (loss sum, count): a plain forward, or a pipeline schedule's.
    """
    order = BatchOrder(dataset.split("val").num_rows, global_batch, seed=0, shuffle=False)
    local = order.local_batch(num_consumers)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for step, rows in stream_batches(dataset, order, split="val", consumer=consumer,
                                     num_consumers=num_consumers, num_steps=batches):
        inputs, targets = objective(torch.from_numpy(rows).long().to(device), step, consumer * local)
        loss, count = loss_sums(inputs, targets)
        totals += torch.stack([torch.as_tensor(loss).double(), torch.as_tensor(count).double()])
    return totals


def forward_loss_sums(module: torch.nn.Module, objective: Objective, compute=contextlib.nullcontext):
    """loss_sums for a model that is not pipelined; compute() is the context it runs in (autocast…)."""

    def loss_sums(inputs: torch.Tensor, targets: torch.Tensor):
        with compute():
            return token_loss(module(inputs, causal=objective.causal), targets)

    return loss_sums


def loss_and_perplexity(totals: torch.Tensor) -> dict[str, float]:
    loss = float(totals[0] / totals[1].clamp(min=1))
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}


def unigram_baseline(dataset: PreparedDataset) -> float:
    """Cross-entropy (nats/token) on val of the train split's token frequencies: the bar to beat."""
    import numpy as np

    from raytrain.data.stream import read_rows

    train, val = dataset.split("train"), dataset.split("val")
    vocab = dataset.manifest["tokenizer"]["vocab_size"]
    counts = np.bincount(read_rows(train, np.arange(train.num_rows), dataset.row_len).reshape(-1), minlength=vocab)
    log_probs = np.log((counts + 1) / (counts.sum() + vocab))  # add-one: unseen tokens stay finite
    val_tokens = read_rows(val, np.arange(val.num_rows), dataset.row_len)[:, 1:].reshape(-1)
    return float(-log_probs[val_tokens].mean())
