"""`raytrain pretrain`: next-token (or masked) language modelling on packed documents, from scratch or a model."""

from __future__ import annotations

from raytrain.stages.base import PreparedDataStage
from raytrain.train.objectives import Objective


class Pretrain(PreparedDataStage):
    name = "pretrain"
    order = 10
    help = "pre-train a model on Ray Train workers"
    objectives = ("causal", "masked")
    family = "pretrain"
    objective_class = Objective
    data_kind = "pretrain"

    def make_objective(self, config, special, multiple):
        train = config.train
        return Objective(train.objective, seed=train.seed, global_batch=train.global_batch,
                         mask_fraction=train.mask_fraction, mask_id=special["mask"], trim_multiple=multiple)


STAGE = Pretrain()
