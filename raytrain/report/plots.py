"""The report's PNGs: the sections of train/panels.py with a family's runs overlaid, and per searched key of a
sweep the metric against the key. Figures are drawn on Agg canvases directly: no pyplot state, no display."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from raytrain.report.inputs import Run, Sweep, is_number, parse_float
from raytrain.train.panels import FAMILIES, Section
from raytrain.tune.record import LISTS

LINE_STYLES = ("-", "--", ":", "-.")  # per metric of a panel: train/loss solid, val/loss dashed
STATUS_MARKERS = {"completed": "o", "stopped early": "v"}  # any other status (error) is drawn as "x"
PANEL_COLUMNS = 3


@dataclass(frozen=True)
class Plot:
    heading: str
    file: str  # beside index.html


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def family_plots(runs: list[Run], folder: Path) -> list[Plot]:
    """One PNG per family and section that some run has data for; a colour per run, kept across sections."""
    plots = []
    for family, sections in FAMILIES.items():
        members = [run for run in runs if run.family == family]
        colours = _colours(len(members))
        for section in sections:
            file = f"{family}-{slug(section.title)}.png"
            if _draw_section(f"{family}: {section.title}", section, members, colours, folder / file):
                plots.append(Plot(f"{family}: {section.title}", file))
    return plots


def _draw_section(title: str, section: Section, runs: list[Run], colours: list, path: Path) -> bool:
    """Draws the section's panels that have data; False (and no file) when none has.

    A run is drawn in a section only when it logs one of the section's own (not val/*) metrics: val/accuracy
    is on both the reward-model and the DPO section, and a reward run belongs on the first only.
    """
    own = [m for m in section.metrics if not m.startswith("val/")]
    members = [(run, colour) for run, colour in zip(runs, colours, strict=True) if any(map(run.logs, own))]
    panels = [present for panel in section.panels
              if (present := [m for m in panel if any(run.logs(m) for run, _ in members)])]
    if not panels:
        return False
    columns = min(PANEL_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(5.2 * columns, 3.6 * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, metrics in zip(axes, panels, strict=False):
        for run, colour in members:
            for style, metric in zip(LINE_STYLES, metrics, strict=False):
                steps, values = run.series(metric)
                if steps:
                    # A single point (one val record) would be an invisible line.
                    ax.plot(steps, values, color=colour, linestyle=style, marker="o" if len(steps) == 1 else None)
        ax.set_title(", ".join(metrics))
        ax.set_xlabel("step")
        ax.set_ylabel(", ".join(dict.fromkeys(m.split("/")[-1] for m in metrics)))
        ax.grid(alpha=0.3)
        if len(metrics) > 1:
            ax.legend(handles=[Line2D([], [], color="0.3", linestyle=style, label=metric)
                               for style, metric in zip(LINE_STYLES, metrics, strict=False)], fontsize="small")
    for ax in axes[len(panels):]:
        ax.remove()
    fig.suptitle(title, fontsize="x-large")
    fig.legend(handles=[Line2D([], [], color=colour, label=run.name) for run, colour in members],
               loc="outside lower center", ncols=min(4, len(members)), title="run")
    _save(fig, path)
    return True


def sweep_plots(sweep: Sweep, folder: Path, prefix: str) -> list[Plot]:
    """Per searched key: the final metric of each trial against its value, marker by status, best ringed."""
    metric = sweep.record.metric
    scored = [(i, t, value) for i, t in enumerate(sweep.trials) if (value := parse_float(t["final"])) is not None]
    if not scored:
        return []
    plots = []
    for key, domain in sweep.space.items():
        (kind, options), = domain.items()
        xs, ticks = _positions(kind, options, [str(t[key]) for _, t, _ in scored])
        fig = Figure(figsize=(6.4, 4.6), layout="constrained")
        ax = fig.subplots()
        for status in dict.fromkeys(t["status"] for _, t, _ in scored):
            points = [(x, value) for x, (_, t, value) in zip(xs, scored, strict=True) if t["status"] == status]
            ax.scatter(*zip(*points, strict=True), marker=STATUS_MARKERS.get(status, "x"), s=45, label=status)
        for x, (i, t, value) in zip(xs, scored, strict=True):
            if i == sweep.best:
                ax.scatter([x], [value], s=260, facecolors="none", edgecolors="crimson", linewidths=2,
                           label=f"best (trial {t['trial']})")
        if kind == "loguniform":
            ax.set_xscale("log")
        if ticks is not None:
            ax.set_xticks(range(len(ticks)), ticks)
            ax.set_xlim(-0.5, len(ticks) - 0.5)
        elif kind not in LISTS and _is_range(options):
            # The searched range, shaded: where in it the trials landed (and room for the log axis' labels).
            ax.axvspan(*options, color="0.93", zorder=0, label="searched range")
        ax.set_title(f"{sweep.name}: final {metric} vs {key}")
        ax.set_xlabel(f"{key} ({kind})")
        ax.set_ylabel(f"final {metric} ({sweep.record.mode} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        file = f"{prefix}-{slug(key)}.png"
        _save(fig, folder / file)
        plots.append(Plot(f"sweep {sweep.name}: {metric} vs {key}", file))
    return plots


def _positions(kind: str, options: Any, values: list[str]) -> tuple[list[float], list[str] | None]:
    """x of each trial: its number, or for choices that are not all numbers the option's position (ticks)."""
    listed = options if kind in LISTS and isinstance(options, list) else []
    if all(is_number(o) for o in listed):
        numbers = [parse_float(v) for v in values]
        if all(n is not None for n in numbers):
            return [float(n) for n in numbers if n is not None], None
    ticks = list(dict.fromkeys([*(str(o) for o in listed), *values]))  # the space in sweep.yaml order, then others
    return [float(ticks.index(v)) for v in values], ticks


def _is_range(options: Any) -> bool:
    return isinstance(options, list) and len(options) == 2 and all(map(is_number, options))


def _colours(count: int) -> list:
    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
