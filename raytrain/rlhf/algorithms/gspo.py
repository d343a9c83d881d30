"""GSPO (Zheng et al., 2025): GRPO's group advantages with a sequence-level importance ratio
s = exp(mean_t log π/π_old), clipped at 1 ± (3e-4, 4e-4), and a mean over sequences (each response weighs the
same whatever its length)."""

from __future__ import annotations

import torch

from raytrain.config import PPOConfig
from raytrain.rlhf.algorithms.grpo import GroupRelative
from raytrain.rlhf.ppo_math import sequence_policy_loss


class GroupSequence(GroupRelative):
    name = "gspo"
    order = 5
    summary = "GRPO's advantages, sequence-level ratio clipped at 1 ± (3e-4, 4e-4), mean over sequences"
    clip_range = (3e-4, 4e-4)

    def token_weights(self, mask: torch.Tensor) -> torch.Tensor:
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1)

    def policy_loss(self, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    weights: torch.Tensor, tis: torch.Tensor,
                    ppo: PPOConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return sequence_policy_loss(logp, old_logp, advantages, weights, *self.clip(ppo), tis)


ALGORITHM = GroupSequence()
