"""Training objectives: each turns token rows into (inputs, targets); the loss is shared.

Targets of -100 are ignored. Any randomness (the masked-LM mask) is drawn for the whole
global batch from (seed, step), then sliced, so it does not depend on the parallel layout.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

IGNORE = -100


def causal_lm(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predict token t+1 from tokens ≤ t."""
    return rows[:, :-1], rows[:, 1:]


def masked_lm(rows: torch.Tensor, *, seed: int, step: int, first_row: int, global_batch: int,
              fraction: float, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a fraction of positions by the mask token; predict the originals there only."""
    tokens = rows[:, :-1]
    rng = np.random.Generator(np.random.Philox(key=seed, counter=step))
    chosen = rng.random((global_batch, tokens.shape[1])) < fraction
    chosen = torch.from_numpy(chosen[first_row : first_row + len(rows)]).to(rows.device)
    inputs = tokens.masked_fill(chosen, mask_id)
    targets = tokens.masked_fill(~chosen, IGNORE)
    return inputs, targets


def target_count(targets: torch.Tensor) -> torch.Tensor:
    """How many positions carry a target (the rest are IGNORE)."""
    return (targets != IGNORE).sum()


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy over the targeted positions, number of them).

    Logits split over the vocabulary (loss parallel) give a replicated DTensor loss; its local
    value is the whole loss, and gradients flow back through it.
    """
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum")
    if isinstance(loss, DTensor):
        loss = loss.to_local()
    return loss, target_count(targets)


class Objective:
    """The stage's way of turning a rank's rows into (inputs, targets), and its attention."""

    def __init__(self, kind: str, *, seed: int, global_batch: int, mask_fraction: float, mask_id: int):
        self.kind = kind
        self.causal = kind == "causal"
        self.seed = seed
        self.global_batch = global_batch
        self.mask_fraction = mask_fraction
        self.mask_id = mask_id

    def __call__(self, rows: torch.Tensor, step: int, first_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.causal:
            return causal_lm(rows)
        return masked_lm(rows, seed=self.seed, step=step, first_row=first_row,
                         global_batch=self.global_batch, fraction=self.mask_fraction, mask_id=self.mask_id)
