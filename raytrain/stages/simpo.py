"""`raytrain simpo`: SimPO (Meng et al., 2024) — preference optimisation without a reference model, on the same
preference rows as DPO: each response's reward is its length-normalised log-probability, and the better one must
win by a margin."""

from __future__ import annotations

import torch

from raytrain.stages.dpo import DirectPreferenceOptimisation
from raytrain.train.objectives import DirectPreference, pairwise_loss, ranked_pairs


class SimplePreference(DirectPreference):
    """s = β · log π / |reply| (the mean log-probability of the reply tokens, no reference), through the
    Bradley–Terry loss with a target margin: −log σ(s_i − s_j − γ) over the ranked pairs."""

    prefix = "simpo"
    reference = False

    def __init__(self, pad_id: int, beta: float, gamma: float, multiple: int = 1, responses: int = 0,
                 packing: bool = False):
        super().__init__(pad_id, beta, multiple, responses, packing)
        self.gamma = gamma

    def loss(self, logits: torch.Tensor, targets) -> tuple[torch.Tensor, torch.Tensor]:
        reward = self.beta * self.sequence_logp(logits, targets) / self.reply_lengths(targets)
        return pairwise_loss(reward, ranked_pairs(targets.ends), self.gamma)


class SimplePreferenceOptimisation(DirectPreferenceOptimisation):
    name = "simpo"
    order = 42
    help = "SimPO: preference optimisation of an SFT model without a reference model"
    objectives = ("simpo",)
    objective_class = SimplePreference
    what = "SimPO"

    def make_objective(self, config, special, multiple, responses=0):
        return SimplePreference(special["pad"], config.train.simpo_beta, config.train.simpo_gamma, multiple,
                                responses, config.train.packing)


STAGE = SimplePreferenceOptimisation()
