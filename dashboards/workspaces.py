"""The workspaces: one per stage family (the sections of train/panels.py over the runs of its W&B job types) and
one per sweep (each searched config key against the sweep's metric, over the runs of the sweep's W&B group).
Building them needs neither a W&B key nor the network.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws

from raytrain import storage
from raytrain.errors import ConfigError
from raytrain.stages import STAGES, families
from raytrain.train.panels import FAMILIES
from raytrain.tune.record import SWEEP_FILE, Sweep
from raytrain.tune.record import read_sweep as read_sweep_file

PREFIX = "raytrain · "
TITLES = {"pretrain": "pre-training", "finetune": "fine-tuning, reward model and DPO", "ppo": "PPO and GRPO"}
# Family → the W&B job types of its runs: a run's job_type is its stage's name (GRPO runs are `raytrain ppo`'s).
JOB_TYPES = families()
LOGGED = frozenset(metric for stage in STAGES.values() for metric in stage.metrics)


def stage_workspaces(entity: str, project: str) -> dict[str, ws.Workspace]:
    """Family ("pretrain", "finetune", "ppo") → its workspace."""
    return {family: _stage_workspace(entity, project, family) for family in FAMILIES}


def _stage_workspace(entity: str, project: str, family: str) -> ws.Workspace:
    sections = [ws.Section(name=section.title, is_open=i == 0,  # the first is the most telling
                           panels=[wr.LinePlot(x="Step", y=list(panel), title=", ".join(panel))
                                   for panel in section.panels])
                for i, section in enumerate(FAMILIES[family])]
    job_type = ws.Metric("JobType")
    types = JOB_TYPES[family]
    runs = ws.And(job_type == types[0] if len(types) == 1 else job_type.isin(list(types)))
    workspace = ws.Workspace(entity=entity, project=project, name=PREFIX + TITLES[family], sections=sections,
                             runset_settings=ws.RunsetSettings(filters=runs))
    return _stable_ids(workspace, family)


def sweep_workspace(entity: str, project: str, sweep_dir: str | Path) -> ws.Workspace:
    """Each searched key against the sweep's metric (scatter plots, one parallel-coordinates plot) and the metric
    over steps, for the runs of the sweep's group, best first."""
    sweep = read_sweep(sweep_dir)
    metric = wr.SummaryMetric(sweep.metric)  # the trial's last logged value
    scatters = [wr.ScatterPlot(title=f"{sweep.metric} vs {d.key}", x=wr.Config(d.key), y=metric,
                               log_x=True if d.kind == "loguniform" else None) for d in sweep.dimensions]
    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(d.key), display_name=d.key,
                                                log=True if d.kind == "loguniform" else None) for d in sweep.dimensions]
    columns.append(wr.ParallelCoordinatesPlotColumn(metric=metric, display_name=sweep.metric))
    parallel = wr.ParallelCoordinatesPlot(title=f"{', '.join(d.key for d in sweep.dimensions)} → {sweep.metric}",
                                          columns=columns)
    curves = [wr.LinePlot(x="Step", y=[key], title=key) for key in dict.fromkeys((sweep.metric, "train/loss"))]
    section = ws.Section(name=f"{sweep.metric} ({sweep.mode}) against the searched keys", is_open=True,
                         panels=[*scatters, parallel, *curves])
    runs = ws.RunsetSettings(filters=ws.And(ws.Metric("Group") == sweep.name),
                             order=[ws.Ordering(ws.Summary(sweep.metric), ascending=sweep.mode == "min")])
    # W&B draws the first max_runs runs of the runset in each panel (10 unless told): here, every trial.
    workspace = ws.Workspace(entity=entity, project=project, name=f"{PREFIX}sweep {sweep.name}", sections=[section],
                             runset_settings=runs, settings=ws.WorkspaceSettings(max_runs=max(10, sweep.trials)))
    return _stable_ids(workspace, sweep.slug)


def all_workspaces(entity: str, project: str, sweeps: list[str | Path]) -> dict[str, ws.Workspace]:
    """File stem → workspace: the three stage families, then one per sweep folder."""
    built = dict(stage_workspaces(entity, project))
    for sweep_dir in sweeps:
        slug = read_sweep(sweep_dir).slug
        if slug in built:
            raise ConfigError(f"{sweep_dir}: a second sweep named like '{slug}'; each sweep needs its own name "
                              "(it is also the W&B group of its runs)")
        built[slug] = sweep_workspace(entity, project, sweep_dir)
    return built


def read_sweep(sweep_dir: str | Path) -> Sweep:
    """The sweep, whose metric must be one raytrain logs (a panel of anything else would stay empty)."""
    sweep = read_sweep_file(sweep_dir)
    if sweep.metric not in LOGGED:
        raise ConfigError(f"{storage.join(sweep_dir, SWEEP_FILE)}: 'metric' is {sweep.metric!r}, not a metric raytrain "
                          "logs; e.g. val/loss, val/accuracy or val/reward_mean (raytrain/train/metrics.py lists them)")
    return sweep


def _stable_ids(workspace: ws.Workspace, slug: str) -> ws.Workspace:
    """Panel ids from the workspace and the panel's place instead of random ones, so an export is the same file
    every time (diffable under version control)."""
    for i, section in enumerate(workspace.sections):
        for j, panel in enumerate(section.panels):
            digest = int(hashlib.sha1(f"{slug}/{i}/{j}".encode()).hexdigest(), 16)
            panel._id = _base36(digest)[:11]  # the length and alphabet of the ids W&B generates
    return workspace


def _base36(number: int) -> str:
    digits = []
    while number:
        number, rest = divmod(number, 36)
        digits.append("0123456789abcdefghijklmnopqrstuvwxyz"[rest])
    return "".join(digits) or "0"
