"""DAPO (Yu et al., 2025): GRPO's group advantages with clip-higher (ε_high 0.28 > ε_low 0.2) and dynamic sampling
(prompts whose samples all scored the same leave the loss: they carry no advantage and would only dilute the
token mean). Its token-level normalisation is the loop's token mean, which every algorithm here uses (GRPO's paper
takes a per-sequence mean; GSPO does here). Its soft overlong penalty is ppo.overlong_buffer (any algorithm may use
it); the paper drops the KL term: set ppo.kl_coef=0 for its recipe."""

from __future__ import annotations

from raytrain.rlhf.algorithms.grpo import GroupRelative


class DecoupledClipDynamicSampling(GroupRelative):
    name = "dapo"
    order = 4
    summary = "GRPO with clip-higher (0.2/0.28), all-equal groups dropped"
    filters_groups = True
    clip_range = (0.2, 0.28)


ALGORITHM = DecoupledClipDynamicSampling()
