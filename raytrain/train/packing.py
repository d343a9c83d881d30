"""Sequence packing for fine-tuning rows (`train.packing=true`): a micro-batch's examples (SFT's conversations, a
reward model's or DPO's responses) packed into as few rows as they fit, each attending to itself only.

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


@dataclass
class Placement:
    """Where packed sequences sit: for each packed position [n, T] the flat index of its token in the source rows
    [m, L] (−1: fill), and for each source sequence the flat index of its first packed position (−1: not packed)."""

    source: torch.Tensor
    starts: torch.Tensor
    row_len: int

    @property
    def sequences(self) -> torch.Tensor:
        """[n, T] the source sequence each packed position belongs to (−1: fill)."""
        return torch.where(self.source >= 0, self.source // self.row_len, -1)

    def place(self, values: torch.Tensor, fill: int) -> torch.Tensor:
        """Per-position values of the source rows [m, ≥ packed length] → their packed layout [n, T]."""
        values = values[:, : self.row_len]
        if values.shape[1] < self.row_len:
            values = torch.nn.functional.pad(values, (0, self.row_len - values.shape[1]), value=fill)
        return torch.where(self.source >= 0, values.flatten()[self.source.clamp(min=0)], fill)


def pack(tokens: torch.Tensor, lengths: list[int], capacity: int, multiple: int) -> tuple[Packed, Placement]:
    """Sequences [m, L] (the first lengths[i] tokens of row i; 0: none) → Packed rows of at most `capacity`
    positions of sequences (first-fit, longest first), T the longest packed row rounded up to `multiple` (sequence
    parallel splits it evenly over tp ranks), and where each sequence went. Each sequence attends to itself only
    and its position ids restart at 0; fill (token 0) attends to fill. None at all: one row of fill."""
    m, row_len = tokens.shape
    present = [i for i in range(m) if lengths[i] > 0]
    bins = first_fit([lengths[i] for i in present], capacity)
    used = max((sum(lengths[present[j]] for j in b) for b in bins), default=0)
    width = -(-max(used, 1) // multiple) * multiple  # past `capacity` by less than `multiple`, as padding is
    source = torch.full((max(1, len(bins)), width), -1, dtype=torch.long)
    starts = torch.full((m,), -1, dtype=torch.long)
    for r, members in enumerate(bins):
        start = 0
        for j in members:
            i, length = present[j], lengths[present[j]]
            source[r, start : start + length] = torch.arange(i * row_len, i * row_len + length)
            starts[i] = r * width + start
            start += length
    placement = Placement(source.to(tokens.device), starts.to(tokens.device), row_len)
    sequences = placement.sequences
    causal = torch.ones(width, width, dtype=torch.bool, device=tokens.device).tril()
    mask = (sequences.unsqueeze(-1) == sequences.unsqueeze(-2)) & causal
    positions = torch.where(placement.source >= 0, placement.source % row_len, 0)
    return Packed(placement.place(tokens, 0), positions, mask.unsqueeze(1), sum(lengths[i] for i in present)), placement


def pack_supervised(rows: torch.Tensor, multiple: int) -> tuple[Packed, torch.Tensor]:
    """Fine-tuning rows [b, 2, L] (tokens, loss mask) → (Packed inputs, targets [n, T]): each example's inputs up to
    its last target (what padding per batch keeps of it), packed into rows of at most L − 1 positions. A row with
    no target (a blank row past a split's end) adds nothing."""
    tokens, trained = rows[:, 0], rows[:, 1].bool()
    index = torch.arange(rows.shape[-1], device=rows.device)
    last = torch.where(trained, index, 0).amax(dim=1).tolist()  # the last target's position, 0: none
    packed, placement = pack(tokens, last, rows.shape[-1] - 1, multiple)
    return packed, placement.place(tokens[:, 1:].masked_fill(~trained[:, 1:], IGNORE), IGNORE)
