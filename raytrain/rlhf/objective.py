"""The RL algorithms' loss on the one loop: an objective over experience batches (rlhf/experience.py).

The model is the policy with, for PPO, the value model beside it (`PolicyAndValue`). Every loss is a weighted
sum over response tokens that the loop divides by the global minibatch's sum of the weights: the token mean
OpenRLHF takes (GSPO: the sequence mean), the same under any data-parallel layout. The configured algorithm
(rlhf/algorithms/) gives the weights and the policy loss.
"""

from __future__ import annotations

import torch

from raytrain.config import PPOConfig
from raytrain.rlhf.algorithms import ALGORITHMS
from raytrain.rlhf.experience import Experience, response_logp
from raytrain.rlhf.ppo_math import entropy, kl_estimate, value_loss

# Sums after [loss, count]: their metric names (divided by the response-token count).
PPO_SUMS = ("ppo/policy_loss", "ppo/value_loss", "ppo/clipfrac", "ppo/approx_kl", "ppo/entropy", "ppo/kl_loss")


class PolicyAndValue(torch.nn.Module):
    """The policy (a language model) and, for PPO, the value model (a score head on every position)."""

    def __init__(self, policy: torch.nn.Module, value: torch.nn.Module | None):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, tokens: torch.Tensor, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        values = self.value(tokens, causal=causal)[..., 0] if self.value is not None else None
        return self.policy(tokens, causal=causal), values


class PolicyObjective:
    head = "lm"
    causal = True
    reference = False
    reference_point = False
    blank = None

    @classmethod
    def logged(cls) -> tuple[str, ...]:
        return ("train/loss", *PPO_SUMS)

    def __init__(self, ppo: PPOConfig):
        self.ppo = ppo
        self.algorithm = ALGORITHMS[ppo.algorithm]
        self.kl_coef = ppo.kl_coef  # β of a KL in the loss; the experience source keeps it current

    def __call__(self, batch: Experience, step: int, first_row: int) -> tuple[torch.Tensor, Experience]:
        return batch.tokens, batch

    def count(self, targets: Experience) -> torch.Tensor:
        return self.algorithm.token_weights(targets.mask).sum()

    def loss(self, outputs, targets: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        logits, values = outputs
        ppo, mask = self.ppo, targets.mask
        weights = self.algorithm.token_weights(mask)
        logp = response_logp(logits, targets.tokens)
        policy, clipped, approx_kl = self.algorithm.policy_loss(logp, targets.old_logp, targets.advantages, weights,
                                                                targets.tis, ppo)
        total = policy
        zero = policy.new_zeros(())
        value = zero
        if values is not None:
            value = value_loss(values[:, :-1], targets.old_values, targets.returns, weights, ppo.value_clip)
            total = total + ppo.value_coef * value
        with torch.set_grad_enabled(ppo.entropy_coef > 0 and torch.is_grad_enabled()):
            token_entropy = entropy(logits[:, :-1], weights)
        if ppo.entropy_coef > 0:
            total = total - ppo.entropy_coef * token_entropy
        kl = zero
        if self.algorithm.kl_in_loss:  # GRPO's way of keeping the policy near the reference: k3 in the loss
            kl = (kl_estimate(logp, targets.ref_logp, "k3") * weights).sum()
            total = total + self.kl_coef * kl
        sums = [self.count(targets), policy, value, clipped, approx_kl, token_entropy, kl]
        return total, torch.stack([s.detach().double() for s in sums])

    def metrics(self, totals: torch.Tensor, split: str) -> dict[str, float]:
        if float(totals[1]) == 0:  # every row left the loss (DAPO: all groups scored alike): nothing to average
            return {"train/loss": 0.0}
        count = float(totals[1])
        result = {"train/loss": float(totals[0]) / count}
        for name, value in zip(PPO_SUMS, totals[2:], strict=True):
            result[name] = float(value) / count
        if not self.algorithm.critic:
            del result["ppo/value_loss"]
        if not self.algorithm.kl_in_loss:
            del result["ppo/kl_loss"]
        return result
