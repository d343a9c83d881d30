"""What an RL algorithm of `raytrain ppo` is: how a scored rollout becomes advantages, and its policy loss.

The experience source builds a `Rollout` (every rank the same) and asks the configured algorithm for advantages
and returns; the objective asks it for the token weights the loss sums over and for the policy loss. A new
algorithm is a new file in this package with an `ALGORITHM` object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytrain.config import PPOConfig
from raytrain.rlhf.ppo_math import policy_loss


@dataclass(frozen=True)
class Rollout:
    """A scored batch on the shifted grid [B, L − 1]: the samples of a prompt are consecutive, `group` of them."""

    scores: torch.Tensor  # [B] the reward, shaped (overlong penalty) where configured
    old_logp: torch.Tensor  # the sampling policy's log-probs
    ref_logp: torch.Tensor  # the reference's
    values: torch.Tensor  # the value model's (zeros without one)
    mask: torch.Tensor  # response tokens
    group: int
    kl_coef: float  # β now (the adaptive controller's)

    @property
    def grouped_scores(self) -> torch.Tensor:
        return self.scores.view(-1, self.group)


class Algorithm:
    name: str
    order: int  # its place in the help text and docs
    summary: str  # one line for the docs
    critic = False  # a value model beside the policy (GAE)
    grouped = True  # compares the samples of a prompt: needs ppo.samples_per_prompt > 1
    kl_in_loss = True  # k3 KL to the reference in the loss (β·Σ k3); else −β·k1 in the reward
    filters_groups = False  # rows of prompts whose samples all scored the same leave the loss
    clip_range = (0.2, 0.2)  # (ε_low, ε_high) when ppo.clip / ppo.clip_high are 0

    def advantages(self, rollout: Rollout, ppo: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """(advantages, returns) [B, L − 1], 0 on padding; returns only matter with a critic."""
        raise NotImplementedError

    def clip(self, ppo: PPOConfig) -> tuple[float, float]:
        low = ppo.clip or self.clip_range[0]
        return low, ppo.clip_high or (self.clip_range[1] if not ppo.clip else low)

    def token_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """What the loss sums over each token with; the loop divides by their global sum (here: a token mean)."""
        return mask

    def policy_loss(self, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    weights: torch.Tensor, tis: torch.Tensor,
                    ppo: PPOConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return policy_loss(logp, old_logp, advantages, weights, *self.clip(ppo), tis)


def per_response(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] advantages (or [P, G]) on every token of their response."""
    return advantages.reshape(-1, 1) * mask
