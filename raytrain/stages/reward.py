"""`raytrain reward`: a score head trained with the Bradley–Terry loss on ranked responses, from an SFT model.
Its checkpoints carry the score statistics over the train split, which PPO normalises rewards with."""

from __future__ import annotations

from raytrain.stages.base import PreparedDataStage
from raytrain.train.objectives import PairwiseReward, score_statistics
from raytrain.train.packing import model_call


class RewardModel(PreparedDataStage):
    name = "reward"
    order = 30
    help = "train a reward model on ranked responses (Bradley–Terry)"
    objectives = ("reward",)
    family = "finetune"
    objective_class = PairwiseReward
    sweep_metric = ("val/accuracy", "max")
    data_kind = "prefs"
    head = "score"
    pipeline = False
    packs = True
    starts_from, what = "an SFT run", "a reward model"

    def make_objective(self, config, special, multiple, responses=0):
        return PairwiseReward(special["pad"], multiple, responses, config.train.packing)

    def checkpoint_meta(self, worker) -> dict:
        """The score mean and std over every response of the train split (every rank takes part)."""
        (module,) = worker.modules
        objective = worker.objective

        def sums_of(inputs, targets):
            with worker.compute():
                return objective.score_sums(model_call(module, inputs, causal=True), targets)

        return {"reward": score_statistics(worker.source.split_sums(sums_of, "train", 0))}


STAGE = RewardModel()
