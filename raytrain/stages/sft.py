"""`raytrain sft`: the language-model loss on the answer tokens of chat rows, from a pre-trained model."""

from __future__ import annotations

from raytrain.stages.base import PreparedDataStage
from raytrain.train.objectives import SupervisedObjective


class SupervisedFineTuning(PreparedDataStage):
    name = "sft"
    order = 20
    help = "fine-tune on conversations: loss on the answer tokens only"
    objectives = ("sft",)
    family = "finetune"
    objective_class = SupervisedObjective
    data_kind = "sft"
    starts_from, what = "a pre-training run", "fine-tuning"
    packs = True

    def make_objective(self, config, special, multiple):
        train = config.train
        return SupervisedObjective("sft", seed=train.seed, global_batch=train.global_batch,
                                   mask_fraction=train.mask_fraction, mask_id=special["mask"], trim_multiple=multiple,
                                   packing=train.packing)


STAGE = SupervisedFineTuning()
