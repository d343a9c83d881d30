"""REINFORCE++ (Hu, 2025) and, with ppo.samples_per_prompt > 1, REINFORCE++-baseline: the score (less its
prompt's group mean when there is a group) at the last token and −β·k1 on every token, returns summed to the
end of the response (γ), whitened over the whole batch instead of a value model's baseline."""

from __future__ import annotations

import torch

from raytrain.config import PPOConfig
from raytrain.rlhf.algorithms.base import Algorithm, Rollout
from raytrain.rlhf.ppo_math import gae, kl_estimate, token_rewards, whiten


class ReinforcePlusPlus(Algorithm):
    name = "reinforce++"
    order = 3
    summary = "token rewards (k1 KL, score − group mean), returns whitened over the batch; no value model"
    grouped = False
    kl_in_loss = False

    def advantages(self, rollout: Rollout, ppo: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
        scores = rollout.grouped_scores
        scores = (scores - scores.mean(dim=1, keepdim=True) if rollout.group > 1 else scores).reshape(-1)
        kl = kl_estimate(rollout.old_logp, rollout.ref_logp, "k1")
        rewards = token_rewards(scores, kl, rollout.mask, rollout.kl_coef, ppo.score_clip)
        # GAE with no values and λ = 1 is the discounted return to the end of the response.
        returns, _ = gae(rewards, torch.zeros_like(rewards), rollout.mask, ppo.gamma, 1.0)
        return whiten(returns, rollout.mask), rollout.mask * 0


ALGORITHM = ReinforcePlusPlus()
