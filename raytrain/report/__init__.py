"""`raytrain report RUN_OR_SWEEP... --out DIR`: PNG plots and one HTML page from run and sweep folders, no W&B.

The report is built in a hidden folder beside DIR and renamed into place at the end, so an interrupted or
failed report never leaves a half-written DIR, and an older report there is replaced whole.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import uuid
from pathlib import Path

from raytrain import storage
from raytrain.errors import DataError
from raytrain.report.inputs import Sweep, load_inputs
from raytrain.report.page import render_page
from raytrain.report.plots import family_plots, slug, sweep_plots

PAGE = "index.html"
NOT_READ = ("checkpoints", "wandb", "tune")  # the folders of runs and sweeps a report does not read


def write_report(paths: list[Path], out: Path) -> Path:
    """Plots and index.html for the runs and sweeps at `paths`, in `out`; returns the page's path."""
    if not paths:
        raise DataError("raytrain report needs at least one run folder or sweep folder")
    runs, sweeps = load_inputs(paths)
    out = out.resolve()  # a name to put the staging folder beside, also for `--out .`
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()  # mkdir (not mkdtemp) so the report gets the usual permissions
    try:
        plots = family_plots(runs, staging)
        sections = [(sweep, sweep_plots(sweep, staging, prefix)) for sweep, prefix in _prefixes(sweeps)]
        (staging / PAGE).write_text(render_page(runs, sections, plots))
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out / PAGE


def report_command(args: argparse.Namespace) -> None:
    storage.require_local(args.out, "--out of a report", "it is a page to open here")
    with contextlib.ExitStack() as stack:  # runs and sweeps on object storage: their logs, copied here
        paths = [stack.enter_context(storage.local_copy(path, skip=NOT_READ)) for path in args.paths]
        page = write_report(paths, Path(args.out))
    print(f"report: {page} ({len(list(page.parent.glob('*.png')))} plots); open it in a browser")


def _prefixes(sweeps: list[Sweep]) -> list[tuple[Sweep, str]]:
    """A file prefix per sweep; sweeps that share a name are numbered so their plots do not overwrite."""
    used: set[str] = set()
    pairs = []
    for sweep in sweeps:
        prefix = base = f"sweep-{slug(sweep.name)}"
        number = 1
        while prefix in used:
            number += 1
            prefix = f"{base}-{number}"
        used.add(prefix)
        pairs.append((sweep, prefix))
    return pairs


def _check_replaceable(out: Path) -> None:
    """`out` may be new, empty or an older report (index.html and PNGs), never a folder of other files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out '{out}' is a file; give a folder for the report")
    foreign = [p.name for p in out.iterdir() if p.name != PAGE and not (p.is_file() and p.suffix == ".png")]
    if foreign:
        raise DataError(f"--out '{out}' holds {', '.join(sorted(foreign)[:3])}, which a report does not write; "
                        "give a new or empty folder, or an older report to replace")


def _move_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    out.rename(old)
    try:
        staging.rename(out)
    except OSError:
        old.rename(out)  # the older report stays as it was
        raise
    shutil.rmtree(old)
