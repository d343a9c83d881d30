"""sweep.yaml: what a sweep is. `raytrain tune` writes it and resumes by it; `raytrain report` and the sweep
dashboard read it. Reading it loads neither Ray nor torch."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import yaml

from raytrain import storage
from raytrain.errors import ConfigError

SWEEP_FILE = "sweep.yaml"
NOT_A_SWEEP = "pass a sweep folder written by `raytrain tune` (RUNS/SWEEP)"
RANGES = ("loguniform", "uniform", "randint")
LISTS = ("choice", "grid")
KINDS = RANGES + LISTS


@dataclasses.dataclass(frozen=True)
class Dimension:
    key: str  # a config key, e.g. train.lr
    kind: str  # one of KINDS
    values: tuple  # [lo, hi] for a range, the candidates for choice/grid


@dataclasses.dataclass
class Sweep:
    name: str  # also the W&B group of its trials
    stage: str
    metric: str
    mode: str  # min | max
    samples: int
    scheduler: str
    space: dict[str, dict[str, list]]  # config key → {kind: values}, as in SPACE.yaml
    seed: int

    @property
    def dimensions(self) -> list[Dimension]:
        return [Dimension(key, *_one_distribution(f"space.{key}", spec)) for key, spec in self.space.items()]

    @property
    def trials(self) -> int:
        """samples × the grid's combinations."""
        return self.samples * math.prod(len(d.values) for d in self.dimensions if d.kind == "grid")

    @property
    def slug(self) -> str:
        return "sweep-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", self.name).strip("-.") or "unnamed")


def _one_distribution(where: str, spec: Any) -> tuple[str, tuple]:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{where}: give one distribution, one of {', '.join(KINDS)}, e.g. "
                          "{loguniform: [1e-4, 1e-2]}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} needs a non-empty list")
    return kind, tuple(values)


def read_sweep(sweep_dir: str | Path) -> Sweep:
    """SWEEP/sweep.yaml (a folder or a URI); errors name the file and the fix."""
    path = storage.join(sweep_dir, SWEEP_FILE)
    if not storage.is_file(path):
        what = "is not a folder" if not storage.exists(sweep_dir) else f"is not a sweep folder (no {SWEEP_FILE})"
        raise ConfigError(f"{sweep_dir} {what}; {NOT_A_SWEEP}")
    try:
        tree = yaml.safe_load(storage.read_text(path))
    except OSError as exc:
        raise ConfigError(f"cannot read '{path}': {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML; {NOT_A_SWEEP}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping with name, metric, mode and space; {NOT_A_SWEEP}")
    fields = {f.name for f in dataclasses.fields(Sweep)}
    tree = {"stage": "", "mode": "min", "samples": 1, "scheduler": "", "seed": 0,
            **{k: v for k, v in tree.items() if k in fields}}
    sweep = Sweep(**{"name": None, "metric": None, "space": None, **tree})
    if not isinstance(sweep.name, str) or not sweep.name.strip():
        raise ConfigError(f"{path}: 'name' must be the sweep's name (its W&B group); {NOT_A_SWEEP}")
    if not isinstance(sweep.metric, str) or not sweep.metric:
        raise ConfigError(f"{path}: 'metric' must name what the sweep optimises, e.g. val/loss")
    if sweep.mode not in ("min", "max"):
        raise ConfigError(f"{path}: 'mode' is {sweep.mode!r}; give min or max")
    if not isinstance(sweep.samples, int) or isinstance(sweep.samples, bool) or sweep.samples < 1:
        raise ConfigError(f"{path}: 'samples' is {sweep.samples!r}; give a whole number ≥ 1")
    if not isinstance(sweep.space, dict) or not sweep.space:
        raise ConfigError(f"{path}: 'space' must map config keys to distributions, e.g. "
                          "'train.lr: {loguniform: [1e-4, 1e-2]}'")
    try:
        sweep.dimensions  # noqa: B018 - each distribution is checked here, where the file can be named
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return sweep


def write_sweep(sweep_dir: str | Path, sweep: Sweep) -> None:
    storage.write_text(storage.join(sweep_dir, SWEEP_FILE), yaml.safe_dump(dataclasses.asdict(sweep), sort_keys=False))
