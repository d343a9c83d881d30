"""index.html: the runs table, each sweep's trials, then the plots; one file with inline CSS, every text escaped."""

from __future__ import annotations

from html import escape
from typing import Any

from raytrain.report.inputs import Run, Sweep, is_number
from raytrain.report.plots import Plot
from raytrain.tune.results import BEST_FILE

CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f2f2f2; }
th:first-child, td:first-child { text-align: left; }
tr.best { background: #fff2b8; font-weight: 600; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #666; }
"""
DASH = "—"


def render_page(runs: list[Run], sweeps: list[tuple[Sweep, list[Plot]]], plots: list[Plot]) -> str:
    parts = ["<h1>raytrain report</h1>", "<h2>Runs</h2>", _runs_table(runs)]
    for sweep, sweep_images in sweeps:
        parts += [_sweep_section(sweep), *map(_image, sweep_images)]
    parts += ["<h2>Curves</h2>", *map(_image, plots)] if plots else []
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>raytrain report</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n")


def _runs_table(runs: list[Run]) -> str:
    ends = [run.summary.get(end) or {} for run in runs for end in ("val_first", "val_last")]
    val_metrics = list(dict.fromkeys(key for record in ends for key in record if key.startswith("val/")))
    header = ["run", "stage", "steps", "wall s", "tokens/s", "final train/loss",
              *(f"{metric} first → last" for metric in val_metrics), "folder"]
    rows = []
    for run in runs:
        summary = run.summary
        first, last = summary.get("val_first") or {}, summary.get("val_last") or {}
        rows.append([run.name, run.objective, _number(summary.get("steps")), _number(summary.get("wall_s")),
                     _number(summary.get("tokens_per_s")), _number((summary.get("final") or {}).get("train/loss")),
                     *(f"{_number(first.get(m))} → {_number(last.get(m))}" if m in first or m in last else DASH
                       for m in val_metrics),
                     str(run.path)])
    return _table(header, rows)


def _sweep_section(sweep: Sweep) -> str:
    record, metric = sweep.record, sweep.record.metric
    facts = [f"stage {record.stage or DASH}", f"metric {metric} ({record.mode})",
             f"{len(sweep.trials)} trials of {record.samples} samples", f"scheduler {record.scheduler or DASH}",
             f"folder {sweep.path}"]
    header = ["", *sweep.columns]
    rows = [["★ best" if i == sweep.best else "", *(trial.get(column, "") for column in sweep.columns)]
            for i, trial in enumerate(sweep.trials)]
    parts = [f"<h2>Sweep {escape(sweep.name)}</h2>", f"<p>{escape('; '.join(facts))}</p>",
             _table(header, rows, marked=sweep.best)]
    if sweep.best is None:
        parts.append(f'<p class="note">No trial reported {escape(metric)}.</p>')
    else:
        best = sweep.trials[sweep.best]
        values = "".join(f"<li><code>{escape(key)}</code> = {escape(best[key])}</li>" for key in sweep.space)
        config = sweep.path / BEST_FILE
        where = f"; its config: {config}" if config.is_file() else ""
        parts.append(f"<p>Best trial {escape(best['trial'])} (final {escape(metric)} {escape(best['final'])}"
                     f"{escape(where)}):</p><ul>{values}</ul>")
    if sweep.missing:
        parts.append(f'<p class="note">No run folder (config.yaml and metrics.jsonl) for trials '
                     f"{escape(', '.join(sweep.missing))}; their curves are not drawn.</p>")
    return "\n".join(parts)


def _table(header: list[str], rows: list[list[str]], marked: int | None = None) -> str:
    lines = ["<table>", "<tr>" + "".join(f"<th>{escape(cell)}</th>" for cell in header) + "</tr>"]
    for i, row in enumerate(rows):
        cells = "".join(f"<td>{escape(cell)}</td>" for cell in row)
        lines.append(f'<tr class="best">{cells}</tr>' if i == marked else f"<tr>{cells}</tr>")
    return "\n".join([*lines, "</table>"])


def _image(plot: Plot) -> str:
    return f'<h3>{escape(plot.heading)}</h3>\n<img src="{escape(plot.file)}" alt="{escape(plot.heading)}">'


def _number(value: Any) -> str:
    if not is_number(value):
        return DASH
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"
