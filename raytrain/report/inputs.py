"""What `raytrain report` reads: run folders (config.yaml, metrics.jsonl, summary.json) and sweep folders
(sweep.yaml, trials.csv and the trials' run folders). Every problem is a DataError naming the file."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from raytrain.errors import DataError
from raytrain.stages import all_objectives, stage_of
from raytrain.tune.record import SWEEP_FILE, read_sweep
from raytrain.tune.record import Sweep as SweepRecord
from raytrain.tune.results import TRIALS_FILE, best_row

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"  # train/metrics.py's name
SUMMARY_FILE = "summary.json"
TRIAL_COLUMNS = ("trial", "status", "steps", "final", "best", "run_dir")


@dataclass
class Run:
    path: Path
    name: str  # unique within one report: legends and the runs table tell runs apart by it
    objective: str
    records: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def family(self) -> str:
        return stage_of(self.objective).family

    def logs(self, metric: str) -> bool:
        return any(is_number(record.get(metric)) for record in self.records)

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, from the records that carry it."""
        points = [(r["step"], r[metric]) for r in self.records if is_number(r.get(metric))]
        return [step for step, _ in points], [value for _, value in points]


@dataclass
class Sweep:
    path: Path
    record: SweepRecord  # sweep.yaml
    columns: list[str]  # of trials.csv
    trials: list[dict[str, str]]  # its rows, as written
    best: int | None  # index in `trials` of the trial best.yaml holds; None when no trial has a value
    run_dirs: list[Path]  # the trials' run folders that exist
    missing: list[str]  # trials without a run folder (e.g. one that failed before logging)

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def space(self) -> dict[str, dict[str, Any]]:
        return self.record.space


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_float(text: str) -> float | None:
    """A trials.csv cell as a number; None when empty, not a number or NaN (a trial that never reported)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def load_inputs(paths: list[Path]) -> tuple[list[Run], list[Sweep]]:
    """The runs (given, and those of the sweeps, each folder once) and the sweeps, in the order given."""
    sweeps: list[Sweep] = []
    run_dirs: list[Path] = []
    for path in paths:
        if _has_files(path, SWEEP_FILE, TRIALS_FILE):
            sweeps.append(load_sweep(path))
            run_dirs += sweeps[-1].run_dirs
        elif _has_files(path, CONFIG_FILE, METRICS_FILE):
            run_dirs.append(path)
        else:
            why = ("is neither a run folder (config.yaml and metrics.jsonl) nor a sweep folder (sweep.yaml and "
                   "trials.csv)") if path.exists() else "does not exist"
            raise DataError(f"'{path}' {why}; give run folders (runs/NAME) or sweep folders from `raytrain tune`")
    unique: dict[Path, Path] = {}
    for path in run_dirs:  # a run given directly and as a trial of a sweep is read once
        unique.setdefault(path.resolve(), path)
    runs = [load_run(path) for path in unique.values()]
    _disambiguate(runs)
    return runs, sweeps


def load_run(path: Path) -> Run:
    config = _read_mapping(path / CONFIG_FILE)
    train, run = config.get("train") or {}, config.get("run") or {}
    objective = str(train.get("objective", "causal"))
    if objective not in all_objectives():
        raise DataError(f"{path / CONFIG_FILE}: train.objective is '{objective}'; expected one of "
                        f"{', '.join(all_objectives())}")
    records = read_metrics(path / METRICS_FILE)
    summary_file = path / SUMMARY_FILE
    summary = _read_mapping(summary_file) if summary_file.is_file() else _summary_of(records)
    return Run(path, str(run.get("name") or path.name), objective, records, summary)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    # Undecodable bytes become U+FFFD, so a damaged line fails as bad JSON with its line number.
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg}); each line must be one record such as "
                            '{"step": 10, "train/loss": 2.31}') from None
        if not isinstance(record, dict) or not is_number(record.get("step")):
            raise DataError(f"{path}:{number}: a metrics record must be a JSON object with a numeric 'step'")
        records.append(record)
    return records


def load_sweep(path: Path) -> Sweep:
    record = read_sweep(path)
    trials_file = path / TRIALS_FILE
    with trials_file.open(newline="") as f:
        reader = csv.DictReader(f)
        # Cells a short row lacks are None, a long row's extras sit under None: both dropped, all text.
        trials = [{k: v or "" for k, v in row.items() if k is not None} for row in reader]
        columns = list(reader.fieldnames or ())
    absent = [c for c in (*TRIAL_COLUMNS, *record.space) if c not in columns]
    if absent:
        raise DataError(f"{trials_file}: no column {', '.join(absent)}; expected {', '.join(TRIAL_COLUMNS)} "
                        "and one per searched key")
    for line, trial in enumerate(trials, 2):  # line 1 is the header
        for column in ("final", "best"):
            if trial[column] and parse_float(trial[column]) is None and trial[column].lower() != "nan":
                raise DataError(f"{trials_file}:{line}: {column} is '{trial[column]}', not a number")
    run_dirs, missing = [], []
    for trial in trials:
        run_dir = _trial_run_dir(path, trial["run_dir"])
        if run_dir is None:
            missing.append(trial["trial"])
        else:
            run_dirs.append(run_dir)
    best = best_row(trials, record.mode)  # the rule `raytrain tune` picks best.yaml by
    index = next((i for i, trial in enumerate(trials) if trial is best), None)
    return Sweep(path, record, columns, trials, index, run_dirs, missing)


def _trial_run_dir(sweep_dir: Path, run_dir: str) -> Path | None:
    """The trial's run folder: run_dir (absolute, or relative to the sweep folder), else the folder of that
    name in the sweep folder, for a sweep copied or moved since it ran (`raytrain tune` writes absolute paths)."""
    if not run_dir:
        return None
    candidates = (sweep_dir / run_dir, sweep_dir / Path(run_dir).name)
    return next((c for c in candidates if _has_files(c, CONFIG_FILE, METRICS_FILE)), None)


def _summary_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What summary.json would say (see train/launch.py), for a run that has none yet; its wall time is unknown."""
    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if any(key.startswith("val/") for key in r)]
    speeds = [r["perf/tokens_per_s"] for r in train if is_number(r.get("perf/tokens_per_s"))]
    return {
        "steps": train[-1]["step"] if train else 0,
        "wall_s": None,
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
        "final": train[-1] if train else {},
        "val_first": val[0] if val else {},
        "val_last": val[-1] if val else {},
    }


def _disambiguate(runs: list[Run]) -> None:
    """Runs that share a name (e.g. `tiny` under two roots) get their folder appended."""
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.name} ({run.path})"


def _has_files(folder: Path, *names: str) -> bool:
    return all((folder / name).is_file() for name in names)


def _read_mapping(path: Path) -> dict[str, Any]:
    """A YAML (config.yaml) or JSON (summary.json) file whose top level is a mapping."""
    try:
        tree = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: invalid {path.suffix[1:].upper()} ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(tree, dict):
        raise DataError(f"{path}: expected a mapping at the top level")
    return tree
