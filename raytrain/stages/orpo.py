"""`raytrain orpo`: ORPO (Hong et al., 2024) — supervised fine-tuning and preference optimisation in one loss,
without a reference model, on the same preference rows as DPO."""

from __future__ import annotations

import torch

from raytrain.stages.dpo import DirectPreferenceOptimisation
from raytrain.train.objectives import DirectPreference, pairwise_loss, ranked_pairs


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 − p)) of p = exp(mean log-probability per reply token); p < 1 kept so the odds stay finite."""
    mean_logp = mean_logp.clamp(max=-1e-6)
    return mean_logp - torch.log(-torch.expm1(mean_logp))


class OddsRatioPreference(DirectPreference):
    """Per ranked pair (i above j): the preferred response's NLL per reply token, plus λ · −log σ(log odds_i −
    log odds_j), the odds taken of the mean per-token probability, as TRL's ORPOTrainer takes them."""

    prefix = "orpo"
    reference = False

    def loss(self, logits: torch.Tensor, targets) -> tuple[torch.Tensor, torch.Tensor]:
        mean_logp = self.sequence_logp(logits, targets) / self.reply_lengths(targets)
        pairs = ranked_pairs(targets.ends)
        odds_loss, sums = pairwise_loss(log_odds(mean_logp), pairs)
        preferred_nll = -(mean_logp * pairs.sum(dim=-1)).sum()  # each pair's better response's NLL
        return preferred_nll + self.beta * odds_loss, sums  # beta holds λ (train.orpo_lambda)


class OddsRatioPreferenceOptimisation(DirectPreferenceOptimisation):
    name = "orpo"
    order = 44
    help = "ORPO: SFT and preference optimisation in one loss, without a reference model"
    objectives = ("orpo",)
    objective_class = OddsRatioPreference
    starts_from, what = "a pre-trained or SFT run", "ORPO"

    def make_objective(self, config, special, multiple, responses=0):
        return OddsRatioPreference(special["pad"], config.train.orpo_lambda, multiple, responses,
                                   config.train.packing)


STAGE = OddsRatioPreferenceOptimisation()
