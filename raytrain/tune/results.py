"""A sweep's outputs: trials.csv, best.yaml and the table printed at the end."""

from __future__ import annotations

import csv
import io
import math
import posixpath
from collections.abc import Callable

from raytrain import storage
from raytrain.config import load_config
from raytrain.errors import ConfigError, find_raytrain_error

TRIALS_FILE = "trials.csv"
BEST_FILE = "best.yaml"
COMPLETED, STOPPED, ERROR, NOT_RUN = "completed", "stopped early", "error", "not run"


def trial_rows(grid, sweep, sweep_dir: str, expected_steps: Callable[[dict], int]) -> list[dict]:
    """One row per trial of a Tune ResultGrid: sampled values, final and best metric, status, where it stopped."""
    rows = []
    for result in grid:
        name = posixpath.basename(result.path)
        params = {key: result.config[key] for key in sweep.space}
        history = result.metrics_dataframe
        values = [] if history is None or sweep.metric not in history else list(history[sweep.metric].dropna())
        step = (result.metrics or {}).get("step")
        if result.error is not None:
            status = ERROR
        elif step is None:
            status = NOT_RUN
        else:
            status = COMPLETED if step >= expected_steps(params) else STOPPED
        pick = min if sweep.mode == "min" else max
        rows.append({"trial": name, "status": status, "steps": step if step is not None else "", **params,
                     "final": values[-1] if values else "", "best": pick(values) if values else "",
                     "run_dir": storage.join(sweep_dir, name), "error": _one_line(result.error)})
    return sorted(rows, key=lambda row: row["trial"])


def _one_line(error: BaseException | None) -> str:
    if error is None:
        return ""
    known = find_raytrain_error(error)
    lines = [line for line in str(known or error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def best_row(rows: list[dict], mode: str) -> dict | None:
    """The trial whose final metric is best (ASHA compares trials by their last report too)."""
    scored = [row for row in rows if row["final"] != "" and math.isfinite(float(row["final"]))]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda row: float(row["final"]))


def write_results(sweep_dir: str, sweep, rows: list[dict], wall_s: float) -> dict:
    """trials.csv, best.yaml (the best trial's config as a fresh run, `raytrain STAGE --config best.yaml`), and
    the table on stdout."""
    trials_file, best_file = storage.join(sweep_dir, TRIALS_FILE), storage.join(sweep_dir, BEST_FILE)
    storage.write_text(trials_file, _csv(rows))
    best = best_row(rows, sweep.mode)
    if best is None:
        raise ConfigError(f"no trial of sweep '{sweep.name}' reported {sweep.metric}; see the trials' run folders "
                          f"in {sweep_dir} and {trials_file}")
    config = load_config(storage.join(best["run_dir"], "config.yaml")).with_values({
        "run.root": posixpath.dirname(sweep_dir),  # sweep_dir is absolute: a path or a URI
        "run.name": f"{sweep.name}-best", "tracking.group": ""})
    storage.write_text(best_file, f"# sweep '{sweep.name}': {best['trial']}, {sweep.metric} "
                                  f"{float(best['final']):.6g}\n" + config.to_yaml())
    print(table(rows, sweep, best))
    stopped = sum(row["status"] == STOPPED for row in rows)
    values = ", ".join(f"{key}={_cell(best[key])}" for key in sweep.space)
    print(f"\nsweep '{sweep.name}': {len(rows)} trials ({stopped} stopped early) in {wall_s:.0f}s; best "
          f"{best['trial']} {sweep.metric} {float(best['final']):.4g} with {values}")
    print(f"  {trials_file}\n  {best_file}  (raytrain {sweep.stage} --config {best_file})")
    return {"best": best, "rows": rows, "wall_s": wall_s}


def table(rows: list[dict], sweep, best: dict) -> str:
    columns = ["trial", "status", "steps", *sweep.space, "final", "best"]
    cells = [[_cell(row[c]) for c in columns] + (["← best"] if row is best else []) for row in rows]
    header = columns[:-2] + [f"final {sweep.metric}", "best"]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths + [0], strict=False)) for r in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()

