"""GRPO (Shao et al., 2024): each response's reward normalised within its prompt's group, on all its tokens;
k3 KL to the reference in the loss; no value model."""

from __future__ import annotations

import torch

from raytrain.config import PPOConfig
from raytrain.rlhf.algorithms.base import Algorithm, Rollout, per_response
from raytrain.rlhf.ppo_math import group_advantages


class GroupRelative(Algorithm):
    name = "grpo"
    order = 1
    summary = "(R − group mean) / group std on every token; k3 KL in the loss"

    def advantages(self, rollout: Rollout, ppo: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
        advantages = per_response(group_advantages(rollout.grouped_scores), rollout.mask)
        return advantages, rollout.mask * 0


ALGORITHM = GroupRelative()
