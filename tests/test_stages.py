"""The stage registry: one object per stage owns its names, metrics and rules; configs are frozen, so resolving
one stage's config never reaches another's (the demo's DPO override once leaked into PPO)."""

import dataclasses
import math

import pytest
import torch

from raytrain.config import load_config
from raytrain.demo import demo_configs
from raytrain.errors import ConfigError
from raytrain.stages import STAGES, all_objectives, families, get_stage, stage_of


def test_every_stage_is_one_object_of_the_registry_in_the_chains_order():
    assert list(STAGES) == ["pretrain", "sft", "reward", "dpo", "simpo", "orpo", "kto", "ppo"]
    assert all_objectives() == ("causal", "masked", "sft", "reward", "dpo", "simpo", "orpo", "kto", "ppo", "grpo",
                                "rloo", "reinforce++", "dapo", "gspo")
    assert stage_of("grpo") is STAGES["ppo"] and stage_of("gspo") is STAGES["ppo"]
    assert stage_of("masked") is STAGES["pretrain"]
    assert families() == {"pretrain": ("pretrain",), "finetune": ("sft", "reward", "dpo", "simpo", "orpo", "kto"),
                          "ppo": ("ppo",)}
    with pytest.raises(ConfigError, match="unknown stage 'rlhf'; choose one of pretrain, sft"):
        get_stage("rlhf")
    with pytest.raises(ConfigError, match="no stage's; choose one of causal"):
        stage_of("ipo")
    rules = {name: (s.head, s.pipeline, s.whole_logits, s.sweep_metric) for name, s in STAGES.items()}
    assert rules == {"pretrain": ("lm", True, False, ("val/loss", "min")),
                     "sft": ("lm", True, False, ("val/loss", "min")),
                     "reward": ("score", False, False, ("val/accuracy", "max")),
                     "dpo": ("lm", False, True, ("val/loss", "min")),
                     "simpo": ("lm", False, True, ("val/loss", "min")),
                     "orpo": ("lm", False, True, ("val/loss", "min")),
                     "kto": ("lm", False, True, ("val/loss", "min")),
                     "ppo": ("lm", False, True, ("val/reward_mean", "max"))}


def test_metric_names_are_what_each_stages_objective_logs():
    """The registry's names come from the objectives themselves: what `metrics` returns is what they list."""
    special = {"pad": 2, "assistant": 5, "mask": 6}
    config = load_config("tiny", ["train.objective=dpo"])
    for name in ("pretrain", "sft", "reward", "dpo", "simpo", "orpo", "kto"):
        stage = STAGES[name]
        objective = stage.make_objective(config.with_values({"train.objective": stage.objectives[0]}), special, 1)
        totals = torch.arange(1.0, 9.0)
        logged = {*objective.metrics(totals, "train"), *objective.metrics(totals, "val")}
        assert logged == set(objective.logged()) and logged <= set(stage.metrics), name
    from raytrain.rlhf.objective import PolicyObjective

    for algorithm in ("ppo", "grpo"):
        ppo = load_config("tiny", [f"ppo.algorithm={algorithm}", "ppo.samples_per_prompt=2"]).ppo
        logged = set(PolicyObjective(ppo).metrics(torch.arange(8.0), "train"))
        assert logged <= set(PolicyObjective.logged()) <= set(STAGES["ppo"].metrics)
    assert "val/ppl" not in STAGES["reward"].metrics and "val/loss" not in STAGES["ppo"].metrics
    assert math.isclose(STAGES["pretrain"].make_objective(config, special, 1).metrics(
        torch.tensor([2.0, 1.0]), "val")["val/ppl"], math.exp(2.0))


def test_configs_are_frozen_and_the_demo_stages_share_no_config_object():
    configs = demo_configs(load_config("demo"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        configs["dpo"].parallel.loss_parallel = False  # what `raytrain dpo` once did to the config it was given

    def sections(config):
        return {id(getattr(config, f.name)) for f in dataclasses.fields(config)} | {
            id(getattr(config.data, f.name)) for f in dataclasses.fields(config.data)}

    distinct = {id(c): c for c in configs.values()}.values()
    assert len(distinct) == 7  # tokenizer, prepare and pretrain run one config
    seen: set[int] = set()
    for config in distinct:
        assert not sections(config) & seen  # no section object is shared between two steps' configs
        seen |= sections(config)
    # DPO resolves its own config with whole logits; PPO's is untouched.
    resolved_dpo = configs["dpo"].with_values({"parallel.loss_parallel": False})
    assert not resolved_dpo.parallel.loss_parallel and configs["ppo"].parallel.loss_parallel
    assert configs["dpo"].parallel.loss_parallel
    assert configs["ppo"].ppo.policy.endswith("sft") and configs["reward"].train.init_from.endswith("sft")


def test_a_stage_refuses_what_it_cannot_run_before_anything_starts():
    with pytest.raises(ConfigError, match="fine-tuning starts from a model: pass --init"):
        STAGES["sft"].preflight(load_config("tiny"))
    with pytest.raises(ConfigError, match="'train.data' is empty; set it to a folder from `raytrain data prefs`"):
        STAGES["reward"].preflight(load_config("tiny", ["train.init_from=runs/sft"]))
    with pytest.raises(ConfigError, match="'train.objective' is 'ipo'"):
        STAGES["pretrain"].objective_of(load_config("tiny", ["train.objective=ipo"]))
    with pytest.raises(ConfigError, match="`raytrain reward` cannot run under parallel.pp=2"):
        STAGES["reward"].check_layout(load_config("tiny", ["parallel.workers=2", "parallel.pp=2",
                                                           "train.micro_batches=2"]), 32)
    STAGES["sft"].check_layout(load_config("tiny", ["parallel.workers=2", "parallel.pp=2", "train.micro_batches=2"]),
                               32)
