"""`raytrain dpo`: the policy's implicit reward against a frozen reference (the starting SFT model) through the
pairwise loss, on the reward model's preference rows."""

from __future__ import annotations

from raytrain.errors import DataError
from raytrain.stages.base import PreparedDataStage
from raytrain.train.checkpoint import load_weights
from raytrain.train.objectives import DirectPreference


class DirectPreferenceOptimisation(PreparedDataStage):
    name = "dpo"
    order = 40
    help = "direct preference optimisation of an SFT model on ranked responses"
    objectives = ("dpo",)
    family = "finetune"
    objective_class = DirectPreference
    data_kind = "prefs"
    pipeline = False
    packs = True
    whole_logits = True
    starts_from, what = "an SFT run", "DPO"

    def make_objective(self, config, special, multiple, responses=0):
        return DirectPreference(special["pad"], config.train.dpo_beta, multiple, responses, config.train.packing)

    def check_data(self, dataset):
        if not dataset.objective_options:
            raise DataError(f"'{dataset.root}' holds preference rows without reply masks (prepared before they "
                            "existed); prepare them again with `raytrain data prefs`")

    def build_reference(self, worker):
        """The frozen reference in the policy's layout, never updated; a restart loads it from train.init_from
        again, so it is not part of the checkpoints. None for a loss without one (SimPO, ORPO). A LoRA run's is
        its own base, the policy with its adapters bypassed: no second copy."""
        if not self.objective_class.reference:
            return None
        if worker.train.lora.rank:
            from raytrain.model.lora import BaseModel

            (module,) = worker.modules
            return BaseModel(module)
        import torch

        from raytrain.model.transformer import Transformer

        with torch.device("meta"):
            model = Transformer(worker.config.model)
        # Sharded like the policy; under plain replication a bare copy (DDP is for gradients).
        module = worker.parallelize(model, worker.train.seed, trainable=False)
        load_weights(worker.train.init_from, module)
        return module.requires_grad_(False).eval()


STAGE = DirectPreferenceOptimisation()
