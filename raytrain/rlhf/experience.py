"""A rollout batch as training rows: tokens and the per-token tensors PPO and GRPO train on.

Each sample is its prompt followed by its response, right-padded to one length L (causal attention lets
padding after a sequence change nothing before it). Per-token tensors sit on the *shifted* grid of L − 1
positions: entry t belongs to token t + 1, predicted by the logits at t. `mask` marks response tokens there.
Rows travel through the one loop as an `Experience`: named tensors that slice, chunk and move together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from raytrain.rlhf.ppo_math import kl_estimate, token_logp


@dataclass(frozen=True)
class Experience:
    """A batch of scored samples: tokens [B, L] (long) and, on the shifted grid [B, L − 1] (float32), the
    response mask, the learner's log-probs before the update and the reference's, advantages, returns, the value
    model's values (zeros without one) and each token's truncated importance weight min(π_learner/π_engine, cap)
    (ones without the correction)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    old_values: torch.Tensor
    tis: torch.Tensor

    def _map(self, fn) -> Experience:
        return Experience(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index) -> Experience:
        return self._map(lambda tensor: tensor[index])

    def to(self, device) -> Experience:
        return self._map(lambda tensor: tensor.to(device))

    def chunk(self, pieces: int) -> list[Experience]:
        """Micro-batches, as torch.Tensor.chunk splits rows."""
        size = -(-len(self) // pieces)
        return [self[start:start + size] for start in range(0, len(self), size)]


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def rollout_tensors(prompts: list[list[int]], responses: list[list[int]], ref_logps: list[list[float]],
                    length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [B, L], response mask [B, L − 1], reference log-probs [B, L − 1]) of prompt + response rows."""
    batch = len(prompts)
    tokens = torch.full((batch, length), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, length - 1))
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        start, end = len(prompt), len(prompt) + len(response)
        tokens[i, :end] = torch.tensor(prompt + response)
        mask[i, start - 1 : end - 1] = 1
    return tokens, mask, on_grid(prompts, ref_logps, length)


def on_grid(prompts: list[list[int]], values: list[list[float]], length: int) -> torch.Tensor:
    """Per-response-token values (a list per response) on the shifted grid [B, L − 1], 0 elsewhere."""
    grid = torch.zeros((len(prompts), length - 1))
    for i, (prompt, row) in enumerate(zip(prompts, values, strict=True)):
        grid[i, len(prompt) - 1 : len(prompt) - 1 + len(row)] = torch.tensor(row)
    return grid


def response_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, L − 1] log-probability of each next token under the logits [B, L, V] that predicted it."""
    return token_logp(logits[:, :-1], tokens[:, 1:])


def response_slices(logp: torch.Tensor, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
    """Each response's per-token values out of [B, L − 1] shifted-grid rows."""
    return [logp[i, len(p) - 1 : len(p) + len(r) - 1].tolist()
            for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] Σ_t k1 over each response: the sample estimate of KL(π‖π_ref) of the whole sequence."""
    return (kl_estimate(logp, ref_logp, "k1") * mask).sum(dim=1)
