"""How the logged metrics are laid out for people: the W&B workspaces (`dashboards/`) and `raytrain report`
both draw these sections. A panel is the metrics plotted on one set of axes; every metric of the registry
(each stage's `metrics`) is on some panel of its stage family.
"""

from __future__ import annotations

from dataclasses import dataclass

from raytrain.rlhf.health import MONITORS
from raytrain.stages import STAGES
from raytrain.train.objectives import DirectPreference


@dataclass(frozen=True)
class Section:
    title: str
    panels: tuple[tuple[str, ...], ...]

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(m for panel in self.panels for m in panel)


LOSS = Section("Loss", (("train/loss", "val/loss"), ("val/ppl",)))
# Fine-tuning's adds SFT's held-out exact-match accuracy (a reward or DPO run's val/accuracy shows here too).
FINETUNE_LOSS = Section("Loss", (*LOSS.panels, ("val/accuracy",)))
OPTIMIZER = Section("Optimizer", (("train/lr",), ("train/grad_norm",)))
THROUGHPUT = Section("Throughput", (("perf/tokens_per_s",), ("perf/tokens_per_s_per_worker",), ("perf/mfu",),
                                    ("train/tokens_seen",)))
STEP_TIME = Section("Step time", (("perf/step_time_s",), ("perf/data_wait_frac",)))
MEMORY = Section("Memory", (("mem/peak_gib", "mem/tensor_peak_gib"),
                            ("mem/init_peak_rss_gib", "mem/init_base_rss_gib", "mem/init_plan_gib")))
REWARD_MODEL = Section("Reward model", (("rm/loss",), ("rm/accuracy", "val/accuracy"), ("rm/margin", "val/margin")))
# DPO's and its variants' metrics (a run logs its own stage's): one panel of each quantity for all of them.
PREFERENCE_LOSSES = tuple(stage.objective_class.prefix for stage in STAGES.values()
                          if issubclass(stage.objective_class, DirectPreference))
PREFERENCE_PANELS = (tuple(f"{p}/loss" for p in PREFERENCE_LOSSES),
                     (*(f"{p}/accuracy" for p in PREFERENCE_LOSSES), "val/accuracy"),
                     (*(f"{p}/margin" for p in PREFERENCE_LOSSES), "val/margin"))
# What one of them logs beside those (KTO's reference point): a panel each.
PREFERENCE_EXTRAS = tuple(dict.fromkeys(
    metric for stage in STAGES.values() if issubclass(stage.objective_class, DirectPreference)
    for metric in stage.objective_class.logged() if metric.split("/")[0] in PREFERENCE_LOSSES
    and not any(metric in panel for panel in PREFERENCE_PANELS)))
PREFERENCE = Section("Preference optimisation", (*PREFERENCE_PANELS, *((m,) for m in PREFERENCE_EXTRAS)))
PPO_REWARD = Section("Reward", (("ppo/reward_mean", "val/reward_mean"), ("val/accuracy",), ("ppo/reward_std",),
                                ("ppo/equal_reward_groups",)))
PPO_HEALTH = Section("Health", (tuple(f"health/{name}" for name in MONITORS),))  # 1: fired since the last log
PPO_KL = Section("KL", (("ppo/kl",), ("ppo/kl_coef",), ("ppo/approx_kl",)))
PPO_LOSSES = Section("Losses", (("train/loss",), ("ppo/policy_loss",), ("ppo/value_loss", "ppo/kl_loss"),
                                ("ppo/clipfrac",), ("ppo/entropy",)))
PPO_RESPONSES = Section("Responses", (("ppo/response_len", "val/response_len"),))
PPO_ROLLOUTS = Section("Rollouts", (("perf/rollout_tokens_per_s",), ("perf/rollout_time_frac",),
                                    ("perf/iteration_s",), ("ppo/weight_sync_s",), ("ppo/weight_sync_peak_gib",),
                                    ("ppo/logprob_mismatch", "ppo/logprob_mismatch_max"), ("ppo/staleness",),
                                    ("ppo/regenerated_rollouts",)))

# Stage family (each stage names its own, raytrain/stages/) → its sections, most telling first.
FAMILIES: dict[str, tuple[Section, ...]] = {
    "pretrain": (LOSS, OPTIMIZER, THROUGHPUT, STEP_TIME, MEMORY),
    "finetune": (FINETUNE_LOSS, REWARD_MODEL, PREFERENCE, OPTIMIZER, THROUGHPUT, STEP_TIME, MEMORY),
    "ppo": (PPO_REWARD, PPO_HEALTH, PPO_KL, PPO_LOSSES, PPO_RESPONSES, PPO_ROLLOUTS, OPTIMIZER, THROUGHPUT, STEP_TIME,
            MEMORY),
}
