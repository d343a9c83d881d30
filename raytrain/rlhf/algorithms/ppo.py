"""PPO (Schulman et al., 2017) as OpenRLHF runs it for RLHF: k1 KL in the per-token reward with the clipped
score at the last token, GAE with a value model, whitened advantages, clipped policy and value losses."""

from __future__ import annotations

import torch

from raytrain.config import PPOConfig
from raytrain.rlhf.algorithms.base import Algorithm, Rollout
from raytrain.rlhf.ppo_math import gae, kl_estimate, token_rewards, whiten


class ProximalPolicyOptimisation(Algorithm):
    name = "ppo"
    order = 0
    summary = "value model and GAE; k1 KL in the reward (OpenRLHF's recipe)"
    critic = True
    grouped = False
    kl_in_loss = False

    def advantages(self, rollout: Rollout, ppo: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
        kl = kl_estimate(rollout.old_logp, rollout.ref_logp, "k1")
        rewards = token_rewards(rollout.scores, kl, rollout.mask, rollout.kl_coef, ppo.score_clip)
        advantages, returns = gae(rewards, rollout.values, rollout.mask, ppo.gamma, ppo.lam)
        return whiten(advantages, rollout.mask), returns


ALGORITHM = ProximalPolicyOptimisation()
