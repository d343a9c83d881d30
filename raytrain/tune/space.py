"""A sweep's search space: a YAML file mapping config keys to distributions, checked against the config.

    train.lr: {loguniform: [1e-4, 1e-2]}
    train.weight_decay: {uniform: [0.0, 0.2]}
    train.warmup_steps: {randint: [0, 20]}      # lower bound inclusive, upper exclusive (Ray Tune's)
    model.dim: {choice: [64, 128]}              # sampled
    parallel.activation_checkpointing: {grid: [none, full]}   # every value, × --samples

Every key must be a config value (not a section), every bound and listed value must be a valid value of that
key in the base config, before any trial starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from raytrain import storage
from raytrain.config import FLOAT_TEXT, Config
from raytrain.errors import ConfigError
from raytrain.tune.record import RANGES, Dimension, _one_distribution


def load_space(path: str | Path, config: Config) -> list[Dimension]:
    """Read and check SPACE.yaml (a file or a URI) against `config`; errors name the file, the key and the fix."""
    try:
        tree = yaml.safe_load(storage.read_text(path))
    except OSError as exc:
        raise ConfigError(f"cannot read the search space '{path}': {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML") from None
    if not isinstance(tree, dict) or not tree:
        raise ConfigError(f"{path}: a search space maps config keys to distributions, e.g. "
                          "'train.lr: {loguniform: [1e-4, 1e-2]}'")
    return [parse_dimension(f"{path}: {key}", str(key), spec, config) for key, spec in tree.items()]


def parse_dimension(where: str, key: str, spec: Any, config: Config) -> Dimension:
    hint = key_type(key)
    kind, values = _one_distribution(where, spec)
    values = [float(v) if isinstance(v, str) and FLOAT_TEXT.match(v) else v for v in values]
    if kind in RANGES:
        _check_range(where, kind, values, hint)
    for value in values:
        try:
            config.with_values({key: value})
        except ConfigError as exc:
            raise ConfigError(f"{where}: the value {value!r} is not valid here: {exc}") from None
    return Dimension(key, kind, tuple(values))


def _check_range(where: str, kind: str, values: list, hint: Any) -> None:
    numbers = len(values) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if not numbers:
        raise ConfigError(f"{where}: {kind} needs [low, high], two numbers; got {values}")
    lo, hi = values
    if not lo < hi:
        raise ConfigError(f"{where}: the range [{lo}, {hi}] is empty; give low < high")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0 (got {lo}); use uniform for ranges that reach 0")
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        raise ConfigError(f"{where}: randint needs two integers; got {values}")
    if hint not in (int, float):
        raise ConfigError(f"{where}: {kind} draws numbers but the key holds {_type_name(hint)}; use choice or grid")
    if hint is int and kind != "randint":
        raise ConfigError(f"{where}: the key holds integers; use randint (or choice/grid) instead of {kind}")


def key_type(key: str) -> Any:
    """The type hint of a config value, or a clear error for an unknown key or a section."""
    node: Any = Config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"search space key '{key}': '{'.'.join(parts[:depth])}' is a value, not a section")
        hints = typing.get_type_hints(node)
        if part not in hints:
            prefix = ".".join(parts[:depth])
            close = difflib.get_close_matches(part, list(hints), n=1)
            hint = f" (did you mean '{'.'.join([*parts[:depth], close[0]])}'?)" if close else ""
            raise ConfigError(f"search space key '{key}' is not a config key{hint}; keys of "
                              f"'{prefix or '<top>'}': {', '.join(hints)}")
        node = hints[part]
    if dataclasses.is_dataclass(node):
        raise ConfigError(f"search space key '{key}' is a config section; name one of its values, e.g. "
                          f"'{key}.{dataclasses.fields(node)[0].name}'")
    return node


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def to_tune(space: list[Dimension]) -> dict[str, Any]:
    """Ray Tune's param_space for these dimensions."""
    from ray import tune

    make = {"loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v),
            "randint": lambda v: tune.randint(*v), "choice": lambda v: tune.choice(list(v)),
            "grid": lambda v: tune.grid_search(list(v))}
    return {d.key: make[d.kind](d.values) for d in space}


def space_to_yaml_tree(space: list[Dimension]) -> dict[str, Any]:
    return {d.key: {d.kind: list(d.values)} for d in space}
