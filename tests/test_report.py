"""`raytrain report`: PNGs and index.html from fake run and sweep folders (no Ray, no training)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from raytrain.config import load_config
from raytrain.errors import DataError
from raytrain.report import write_report
from raytrain.report.inputs import METRICS_FILE as REPORT_READS
from raytrain.stages import STAGES, stage_of
from raytrain.train.metrics import METRICS_FILE
from raytrain.train.panels import FAMILIES

METRICS, REWARD_METRICS, PPO_METRICS = (STAGES[name].metrics for name in ("pretrain", "reward", "ppo"))

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPACE = {"train.lr": {"loguniform": [1e-4, 1e-2]}, "train.precision": {"choice": ["fp32", "bf16"]}}


def write_run(folder: Path, name: str, objective: str, metrics: tuple[str, ...], steps: int = 20,
              summary: bool = True) -> Path:
    """A run folder as training leaves it: val/* metrics only every 10 steps, in records of their own."""
    folder.mkdir(parents=True)
    load_config("tiny", [f"run.name={name}", f"train.objective={objective}"]).save(folder / "config.yaml")
    records = []
    for step in range(1, steps + 1):
        records.append({"step": step, **{m: 1.0 / step + i for i, m in enumerate(metrics) if not m.startswith("val/")}})
        if step % 10 == 0:
            records.append({"step": step, **{m: 2.0 / step for m in metrics if m.startswith("val/")}})
    (folder / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary:
        val = [r for r in records if any(k.startswith("val/") for k in r)]
        (folder / "summary.json").write_text(json.dumps({
            "steps": steps, "tokens_seen": steps * 256, "wall_s": 12.5, "tokens_per_s": 2048.0,
            "final": records[-2], "val_first": val[0] if val else {},
            "val_last": val[-1] if val else {}, "checkpoint": None}))
    return folder


def write_sweep(folder: Path) -> Path:
    """Two trials as `raytrain tune` leaves them, the second stopped early and its run_dir from before the sweep
    folder was moved (found by its name in the sweep folder)."""
    folder.mkdir()
    write_run(folder / "t0", "lr-sweep-0", "causal", METRICS, summary=False)
    write_run(folder / "t1", "lr-sweep-1", "causal", METRICS, steps=10)
    (folder / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "lr sweep", "stage": "pretrain", "metric": "val/loss", "mode": "min", "samples": 2,
        "scheduler": "asha", "space": SPACE, "seed": 0}))
    (folder / "best.yaml").write_text(load_config("tiny", ["train.lr=0.003", "train.precision=bf16"]).to_yaml())
    # Trial 1's best beats trial 0's, but tune (and so the report) ranks trials by their final value.
    rows = [{"trial": "t0", "status": "completed", "steps": "20", "train.lr": "0.003", "train.precision": "bf16",
             "final": "0.1", "best": "0.1", "run_dir": str((folder / "t0").resolve()), "error": ""},
            {"trial": "t1", "status": "stopped early", "steps": "10", "train.lr": "0.0002",
             "train.precision": "fp32", "final": "0.2", "best": "0.05", "run_dir": "/moved/away/lr-sweep/t1",
             "error": ""}]
    with (folder / "trials.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def expected_family_pngs(runs: dict[str, tuple[str, tuple[str, ...]]]) -> set[str]:
    """A section is drawn when some run of its family logs one of its own metrics (val/* go with those)."""
    logged: dict[str, set[str]] = {}
    for objective, metrics in runs.values():
        logged.setdefault(stage_of(objective).family, set()).update(m for m in metrics if not m.startswith("val/"))
    return {f"{family}-{re.sub('[^a-z0-9]+', '-', section.title.lower())}.png"
            for family, metrics in logged.items() for section in FAMILIES[family]
            if set(section.metrics) & metrics}


RUNS = {"pre": ("causal", METRICS), "chat-sft": ("sft", METRICS), "rm": ("reward", REWARD_METRICS),
        "rl": ("ppo", PPO_METRICS)}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("report")
    paths = [write_run(base / "runs" / name, name, objective, metrics) for name, (objective, metrics) in RUNS.items()]
    paths.append(write_sweep(base / "sweep"))
    out = base / "out"
    return write_report(paths, out), out


def test_report_writes_every_plot_as_png(report):
    page, out = report
    assert page == out.resolve() / "index.html"
    pngs = {p.name for p in out.glob("*.png")}
    sweep_pngs = {"sweep-lr-sweep-train-lr.png", "sweep-lr-sweep-train-precision.png"}
    assert pngs == expected_family_pngs(RUNS) | sweep_pngs
    assert "pretrain-loss.png" in pngs and "finetune-reward-model.png" in pngs and "ppo-kl.png" in pngs
    assert "finetune-dpo.png" not in pngs  # no DPO run: its section is skipped
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_SIGNATURE, png


def test_page_references_plots_runs_and_trials(report):
    page, out = report
    text = page.read_text()
    images = set(re.findall(r'<img src="([^"]+)"', text))
    assert images == {p.name for p in out.glob("*.png")}
    for name in [*RUNS, "lr-sweep-0", "lr-sweep-1"]:
        assert f"<td>{name}</td>" in text
    assert "pretrain: Loss" in text and "ppo: Reward" in text
    assert "val/loss first → last" in text and "val/reward_mean first → last" in text
    # The trials table: both trials, the best one marked, and its searched values listed.
    assert "Sweep lr sweep" in text and "<td>stopped early</td>" in text
    best_row = re.search(r'<tr class="best">(.*?)</tr>', text).group(1)
    assert "★ best" in best_row and "<td>t0</td>" in best_row and "<td>0.003</td>" in best_row
    assert "<li><code>train.lr</code> = 0.003</li>" in text
    assert "<li><code>train.precision</code> = bf16</li>" in text


def test_second_report_replaces_the_first(tmp_path):
    # One metric each keeps this to one plot per report.
    pre = write_run(tmp_path / "runs" / "pre", "pre", "causal", ("train/loss", "val/loss"))
    rl = write_run(tmp_path / "runs" / "rl", "rl", "ppo", ("ppo/reward_mean", "val/reward_mean"))
    out = tmp_path / "report"
    write_report([rl], out)
    assert {p.name for p in out.glob("*.png")} == {"ppo-reward.png"}
    page = write_report([pre], out)
    assert {p.name for p in out.glob("*.png")} == {"pretrain-loss.png"}
    assert "<td>pre</td>" in page.read_text() and "<td>rl</td>" not in page.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "runs"]  # no staging or old folder left


def test_failed_report_leaves_the_older_one(tmp_path, monkeypatch):
    pre = write_run(tmp_path / "runs" / "pre", "pre", "causal", ("train/loss", "val/loss"))
    out = tmp_path / "report"
    before = write_report([pre], out).read_text()

    def fail(*_):
        raise RuntimeError("disk full")

    monkeypatch.setattr("raytrain.report.render_page", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report([pre], out)
    assert (out / "index.html").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "runs"]


def test_report_reads_the_file_training_writes():
    assert REPORT_READS == METRICS_FILE


def test_bad_paths_are_named(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="'.*nowhere' does not exist"):
        write_report([tmp_path / "nowhere"], out)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"is neither a run folder \(config.yaml and metrics.jsonl\) nor a sweep"):
        write_report([tmp_path / "stuff"], out)
    assert not out.exists()


def test_bad_metrics_line_names_file_and_line(tmp_path):
    run = write_run(tmp_path / "run", "run", "causal", METRICS, steps=3)
    lines = (run / METRICS_FILE).read_text().splitlines()
    lines[2] = '{"step": 3, "train/loss": '
    (run / METRICS_FILE).write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"metrics\.jsonl:3: not valid JSON"):
        write_report([run], tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_out_holding_other_files_is_refused(tmp_path):
    run = write_run(tmp_path / "run", "run", "causal", METRICS, steps=3)
    with pytest.raises(DataError, match="which a report does not write"):
        write_report([run], tmp_path)  # the folder holding the run is not a report to replace
    assert (run / METRICS_FILE).is_file()
