"""RLOO (Ahmadian et al., 2024): REINFORCE with a leave-one-out baseline, R_i − mean of the other samples of its
prompt, where R is the score less β times the response's KL to the reference (k1 summed, TRL's RLOO); the
clipped surrogate of the token ratio; no value model."""

from __future__ import annotations

import torch

from raytrain.config import PPOConfig
from raytrain.rlhf.algorithms.base import Algorithm, Rollout, per_response
from raytrain.rlhf.experience import sequence_kl
from raytrain.rlhf.ppo_math import leave_one_out_advantages


class LeaveOneOut(Algorithm):
    name = "rloo"
    order = 2
    summary = "R − mean of the other samples, R = score − β·Σ k1; no value model"
    kl_in_loss = False

    def advantages(self, rollout: Rollout, ppo: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
        kl = sequence_kl(rollout.old_logp, rollout.ref_logp, rollout.mask)
        reward = rollout.scores.clamp(-ppo.score_clip, ppo.score_clip) - rollout.kl_coef * kl
        advantages = per_response(leave_one_out_advantages(reward.view(-1, rollout.group)), rollout.mask)
        return advantages, rollout.mask * 0


ALGORITHM = LeaveOneOut()
