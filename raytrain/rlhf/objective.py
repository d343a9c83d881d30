"""PPO's and GRPO's loss on the one loop: an objective over experience batches (rlhf/experience.py).

The model is the policy with, for PPO, the value model beside it (`PolicyAndValue`). Every loss is a sum over
response tokens that the loop divides by the global minibatch's response-token count: the token mean
OpenRLHF takes, the same under any data-parallel layout.
"""

from __future__ import annotations

import torch

from raytrain.config import PPOConfig
from raytrain.rlhf.experience import Experience, response_logp
from raytrain.rlhf.ppo_math import entropy, kl_estimate, policy_loss, value_loss

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
    blank = None

    @classmethod
    def logged(cls) -> tuple[str, ...]:
        return ("train/loss", *PPO_SUMS)

    def __init__(self, ppo: PPOConfig):
        self.ppo = ppo
        self.kl_coef = ppo.kl_coef  # GRPO's β in the loss; the experience source keeps it current

    def __call__(self, batch: Experience, step: int, first_row: int) -> tuple[torch.Tensor, Experience]:
        return batch.tokens, batch

    def count(self, targets: Experience) -> torch.Tensor:
        return targets.mask.sum()

    def loss(self, outputs, targets: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        logits, values = outputs
        ppo, mask = self.ppo, targets.mask
        logp = response_logp(logits, targets.tokens)
        policy, clipped, approx_kl = policy_loss(logp, targets.old_logp, targets.advantages, mask, ppo.clip)
        total = policy
        zero = policy.new_zeros(())
        value = zero
        if values is not None:
            value = value_loss(values[:, :-1], targets.old_values, targets.returns, mask, ppo.value_clip)
            total = total + ppo.value_coef * value
        with torch.set_grad_enabled(ppo.entropy_coef > 0 and torch.is_grad_enabled()):
            token_entropy = entropy(logits[:, :-1], mask)
        if ppo.entropy_coef > 0:
            total = total - ppo.entropy_coef * token_entropy
        kl = zero
        if ppo.algorithm == "grpo":  # GRPO keeps the policy near the reference in the loss, with k3
            kl = (kl_estimate(logp, targets.ref_logp, "k3") * mask).sum()
            total = total + self.kl_coef * kl
        sums = [self.count(targets), policy, value, clipped, approx_kl, token_entropy, kl]
        return total, torch.stack([s.detach().double() for s in sums])

    def metrics(self, totals: torch.Tensor, split: str) -> dict[str, float]:
        count = max(float(totals[1]), 1.0)
        result = {"train/loss": float(totals[0]) / count}
        for name, value in zip(PPO_SUMS, totals[2:], strict=True):
            result[name] = float(value) / count
        if self.ppo.algorithm == "grpo":
            del result["ppo/value_loss"]
        else:
            del result["ppo/kl_loss"]
        return result
