"""The rollout engines a rollout actor generates with (ppo.rollout_engine): one file each, found here.

An engine (base.py) holds the policy's weights by our parameter names (the streamed sync copies into them), is told
when a version is complete, and generates token ids from token-id prompts with per-sample seeds, returning each
sampled token's log-probability under its own numerics (the learner compares, and corrects, rlhf/objective.py).
"""

from __future__ import annotations

import importlib
import pkgutil

from raytrain.rlhf.engines.base import RolloutEngine


def _discover() -> dict[str, type[RolloutEngine]]:
    found = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)]
    return {module.ENGINE.name: module.ENGINE for module in found if hasattr(module, "ENGINE")}


ENGINES: dict[str, type[RolloutEngine]] = _discover()
