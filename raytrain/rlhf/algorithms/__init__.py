"""The RL algorithms of `raytrain ppo` (ppo.algorithm): one file each, found here, no list to edit.

Each is an `Algorithm` (base.py): how scores become advantages, where the KL to the reference goes, which rows
count, and its policy loss. The experience source and the objective ask the one named by the config.
"""

from __future__ import annotations

import importlib
import pkgutil

from raytrain.rlhf.algorithms.base import Algorithm


def _discover() -> dict[str, Algorithm]:
    found = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)]
    return {module.ALGORITHM.name: module.ALGORITHM for module in found if hasattr(module, "ALGORITHM")}


ALGORITHMS: dict[str, Algorithm] = dict(sorted(_discover().items(), key=lambda item: item[1].order))
