"""Sequence packing for fine-tuning rows (`train.packing=true`): a micro-batch's examples packed into as few rows as
they fit, each example attending to itself only.

A fine-tuning row holds one example padded to the row length; padding per batch (objectives.trim_padding) still
computes every row up to the batch's longest example. Packed, the examples of a micro-batch are laid end to end
(first-fit, longest first) in rows no longer than the row length; a block-diagonal causal mask keeps each example's
attention within itself and its position ids restart at 0, so every position computes what it computes unpacked,
and the loss (a sum over the same targets, divided by their count over the global batch) is the same. The examples
a step trains on, and so the global batch order, do not change: packing rearranges each micro-batch on the rank
that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytrain.train.objectives import IGNORE


@dataclass
class Packed:
    """Packed inputs: tokens [n, T], each position's id within its example [n, T], the attention mask
    [n, 1, T, T] (True: may attend) and how many of the positions belong to an example (the rest fill)."""

    tokens: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    real: int

    def numel(self) -> int:
        """The positions that hold an example's tokens: what perf/tokens_per_s counts."""
        return self.real


def model_call(module: torch.nn.Module, inputs, causal: bool) -> torch.Tensor:
    """The model's outputs for inputs as an objective gives them: a tensor of tokens, or Packed rows."""
    if isinstance(inputs, Packed):
        return module(inputs.tokens, causal=causal, positions=inputs.positions, mask=inputs.mask)
    return module(inputs, causal=causal)


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Example indices per packed row: longest first, each into the first row it fits (ties keep their order)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            bins.append([])
            room.append(capacity)
            row = len(bins) - 1
        bins[row].append(index)
        room[row] -= lengths[index]
    return bins


def pack_supervised(rows: torch.Tensor, multiple: int) -> tuple[Packed, torch.Tensor]:
    """Fine-tuning rows [b, 2, L] (tokens, loss mask) → (Packed inputs, targets [n, T]): each example's inputs up to
    its last target (what padding per batch keeps of it), packed into rows of at most L − 1 positions, T the longest
    packed row rounded up to `multiple` (sequence parallel splits it over tp ranks). A row with no target (a blank
    row past a split's end) adds nothing; a micro-batch of none is one row of fill."""
    tokens, trained = rows[:, 0], rows[:, 1].bool()
    capacity = rows.shape[-1] - 1
    index = torch.arange(rows.shape[-1], device=rows.device)
    last = torch.where(trained, index, 0).amax(dim=1).tolist()  # the last target's position, 0: none
    examples = [(row, length) for row, length in enumerate(last) if length > 0]
    bins = first_fit([length for _, length in examples], capacity)
    used = max((sum(examples[i][1] for i in b) for b in bins), default=0)
    width = min(capacity, -(-max(used, 1) // multiple) * multiple)
    n = max(1, len(bins))
    packed = torch.zeros(n, width, dtype=tokens.dtype, device=rows.device)
    targets = torch.full((n, width), IGNORE, dtype=tokens.dtype, device=rows.device)
    positions = torch.zeros(n, width, dtype=torch.long, device=rows.device)
    documents = torch.zeros(n, width, dtype=torch.long, device=rows.device)  # 0: fill, which attends to fill
    for r, members in enumerate(bins):
        start = 0
        for document, i in enumerate(members, start=1):
            row, length = examples[i]
            end = start + length
            packed[r, start:end] = tokens[row, :length]
            targets[r, start:end] = tokens[row, 1 : length + 1].masked_fill(~trained[row, 1 : length + 1], IGNORE)
            positions[r, start:end] = torch.arange(length, device=rows.device)
            documents[r, start:end] = document
            start = end
    causal = torch.ones(width, width, dtype=torch.bool, device=rows.device).tril()
    mask = (documents.unsqueeze(-1) == documents.unsqueeze(-2)) & causal
    return Packed(packed, positions, mask.unsqueeze(1), sum(length for _, length in examples)), targets
