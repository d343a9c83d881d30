"""The stage registry: one object per training stage, one file each (pretrain, sft, reward, dpo, simpo, orpo, kto, ppo).

Everything that is about a stage lives on its object (stages/base.py says what): commands, the loop, sweeps,
dashboards, reports, checkpoints and tests read it here, and no other module keeps a table of stage names.
A new stage is a new file here with a `STAGE` object: it is found, no list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil

from raytrain.errors import ConfigError
from raytrain.stages.base import Stage


def _discover() -> dict[str, Stage]:
    found = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)]
    stages = sorted((module.STAGE for module in found if hasattr(module, "STAGE")), key=lambda s: s.order)
    return {stage.name: stage for stage in stages}


STAGES: dict[str, Stage] = _discover()  # in the chain's order (the commands' order in --help)


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown stage '{name}'; choose one of {', '.join(STAGES)}")
    return STAGES[name]


def all_objectives() -> tuple[str, ...]:
    return tuple(objective for stage in STAGES.values() for objective in stage.objectives)


def stage_of(objective: str) -> Stage:
    """The stage that trains a train.objective (a run's config.yaml, a checkpoint's raytrain.json)."""
    for stage in STAGES.values():
        if objective in stage.objectives:
            return stage
    raise ConfigError(f"train.objective '{objective}' is no stage's; choose one of {', '.join(all_objectives())}")


def families() -> dict[str, tuple[str, ...]]:
    """Panel family → the names of its stages (each a W&B job type)."""
    grouped: dict[str, tuple[str, ...]] = {}
    for stage in STAGES.values():
        grouped[stage.family] = (*grouped.get(stage.family, ()), stage.name)
    return grouped
