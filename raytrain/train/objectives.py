"""Training objectives: each turns token rows into (inputs, targets); the loss is shared.

causal: next token; masked: masked LM; sft: next token on the answer tokens a loss mask marks.

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


def supervised(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine-tuning rows [b, 2, L] (tokens, loss mask): predict the next token where the mask marks it."""
    tokens, trained = rows[:, 0], rows[:, 1].bool()
    return tokens[:, :-1], tokens[:, 1:].masked_fill(~trained[:, 1:], IGNORE)


def trim_padding(rows: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad per batch: fine-tuning rows lose the positions after the last trained token of the longest example.

    Nothing later can change an earlier position's causal loss, so the loss is the same. The inputs stay a
    multiple of `multiple` long (sequence parallel splits them over tp ranks).
    """
    trained = rows[:, 1].any(dim=0).nonzero()
    needed = int(trained[-1]) if len(trained) else 1  # inputs up to the last target's position
    length = min(rows.shape[-1] - 1, -(-needed // multiple) * multiple)
    return rows[..., : length + 1]


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

    def __init__(self, kind: str, *, seed: int, global_batch: int, mask_fraction: float, mask_id: int,
                 trim_multiple: int = 0):
        self.kind = kind
        self.causal = kind in ("causal", "sft")
        self.seed = seed
        self.global_batch = global_batch
        self.mask_fraction = mask_fraction
        self.mask_id = mask_id
        self.trim_multiple = trim_multiple  # sft: trim padding to a multiple of this; 0 keeps full rows

    def __call__(self, rows: torch.Tensor, step: int, first_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "sft":
            return supervised(trim_padding(rows, self.trim_multiple) if self.trim_multiple else rows)
        if self.causal:
            return causal_lm(rows)
        return masked_lm(rows, seed=self.seed, step=step, first_row=first_row,
                         global_batch=self.global_batch, fraction=self.mask_fraction, mask_id=self.mask_id)
