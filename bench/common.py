"""What every benchmark section shares: interleaved repeats and their spread, ratio cells that say when they sit
inside the noise, the settings line both sides print, the curves (a table and a PNG), and the sizes of a
`--tiny` run (the smoke test: the scripts start and write their files, the figures mean nothing).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TINY = os.environ.get("RAYTRAIN_BENCH_TINY") == "1"  # set by `python -m bench.run --tiny`
REPEATS = 1 if TINY else 3
THREADS = 2  # torch threads of every side, unless a row says otherwise
FIGURES = Path(os.environ.get("RAYTRAIN_BENCH_FIGURES", Path(__file__).resolve().parent / "figures"))
SPREAD_NOTE = (f"Every figure is the median (min–max) of {REPEATS} interleaved repeats (A B A B A B: drift on the "
               "machine hits both sides alike); a ratio is the ratio of the medians, and where the two sides' "
               "ranges overlap it is marked *inside the noise* rather than counted as a win or a loss.")


def pick(full, tiny):
    """The full benchmark's value, or the tiny one in a smoke run."""
    return tiny if TINY else full


# The tokenizer's corpus where a section trains one: the standard library (the demo's), or this repository's docs in
# a smoke run (faster).
CORPUS = pick([], [f"data.source.inputs=['{Path(__file__).resolve().parent.parent / 'docs'}']"])


@contextlib.contextmanager
def phase(section: str, name: str):
    """Prints how long a part of a section took (the budget of `make bench` is set from these lines)."""
    started = time.perf_counter()
    yield
    print(f"bench {section}: {name} took {time.perf_counter() - started:.1f} s", flush=True)


@dataclass
class Spread:
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def cell(self, fmt: str = "{:,.0f}") -> str:
        """'median (min–max)', or the one value of a single run."""
        if len(self.values) == 1:
            return fmt.format(self.median)
        return f"{fmt.format(self.median)} ({fmt.format(self.low)}–{fmt.format(self.high)})"

    def overlaps(self, other: Spread) -> bool:
        return self.low <= other.high and other.low <= self.high


def interleaved(sides: dict[str, Callable[[], dict[str, float]]], repeats: int = REPEATS
                ) -> dict[str, dict[str, Spread]]:
    """Run each side once per repeat, in turn (A B A B A B); each returns its measures by name.

    Result: side → measure → Spread over the repeats."""
    spreads: dict[str, dict[str, Spread]] = {side: {} for side in sides}
    for _ in range(repeats):
        for side, measure in sides.items():
            for name, value in measure().items():
                spreads[side].setdefault(name, Spread()).values.append(float(value))
    return spreads


def ratio_cell(ours: Spread, baseline: Spread, lower_is_better: bool = False) -> str:
    """The ratio of medians, ours over the baseline (baseline over ours for times or memory, so > 1 is ours better),
    bold when the two ranges do not overlap."""
    ratio = baseline.median / ours.median if lower_is_better else ours.median / baseline.median
    if len(ours.values) > 1 and ours.overlaps(baseline):
        return f"{ratio:.2f}× *inside the noise*"
    return f"**{ratio:.2f}×**"


def settings(**knobs) -> str:
    """The knobs one side ran with, as the page prints them: `dtype=fp32 threads=2 …`."""
    return "`" + " ".join(f"{key}={value}" for key, value in knobs.items()) + "`"


def curve(name: str, title: str, x_label: str, xs: list, series: dict[str, list[float]], y_label: str,
          fmt: str = "{:,.0f}", log_x: bool = False, right: dict[str, list[float]] | None = None,
          right_label: str = "") -> str:
    """A curve as a Markdown table and a PNG (FIGURES/name.png) embedded below it; `right` adds series drawn against
    a second axis (memory beside speed). Missing points are NaN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    right = right or {}
    columns = {**{f"{k}, {y_label}": v for k, v in series.items()},
               **{f"{k}, {right_label}": v for k, v in right.items()}}
    lines = [f"| {x_label} | " + " | ".join(columns) + " |", "|---:|" + "---:|" * len(columns)]
    formats = [fmt] * len(series) + ["{:,.1f}"] * len(right)
    for i, x in enumerate(xs):
        cells = ["—" if v[i] != v[i] else form.format(v[i]) for form, v in zip(formats, columns.values(), strict=True)]
        lines.append(f"| {x:,} | " + " | ".join(cells) + " |")

    figure, axis = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for label, values in series.items():
        axis.plot(xs, values, marker="o", label=label)
    axis.set(title=title, xlabel=x_label, ylabel=y_label)
    if log_x:
        axis.set_xscale("log", base=2)
    axis.grid(alpha=0.3)
    handles, labels = axis.get_legend_handles_labels()
    if right:
        twin = axis.twinx()
        for label, values in right.items():
            twin.plot(xs, values, marker="s", linestyle="--", label=f"{label} ({right_label})")
        twin.set_ylabel(right_label)
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    axis.legend(handles, labels, fontsize=8)
    figure.tight_layout()
    FIGURES.mkdir(parents=True, exist_ok=True)
    figure.savefig(FIGURES / f"{name}.png")
    plt.close(figure)
    return "\n".join([*lines, "", f"![{title}](bench/figures/{name}.png)"])
