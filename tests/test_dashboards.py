"""The W&B workspaces (dashboards/): built, exported and loaded back offline; no Ray, no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dashboards.specs import NO_KEY, export_specs, has_api_key, load_spec, publish
from dashboards.workspaces import JOB_TYPES, read_sweep, stage_workspaces, sweep_workspace
from raytrain.errors import ConfigError, DataError
from raytrain.stages import STAGES

REGISTRY = {family: {m for s in STAGES.values() if s.family == family for m in s.metrics}
            for family in ("pretrain", "finetune", "ppo")}
SWEEP = """\
name: lr-warmup
stage: pretrain
metric: val/loss
mode: min
samples: 4
scheduler: asha
space:
  train.lr: {loguniform: [1.0e-4, 1.0e-2]}
  train.warmup_steps: {randint: [0, 20]}
  parallel.activation_checkpointing: {grid: [none, full]}
"""


def panels(spec: dict) -> list[dict]:
    return [panel for section in spec["spec"]["section"]["panelBankConfig"]["sections"]
            for panel in section["panels"]]


def line_metrics(spec: dict) -> set[str]:
    return {metric for panel in panels(spec) if panel["viewType"] == "Run History Line Plot"
            for metric in panel["config"]["metrics"]}


def runset_filters(spec: dict) -> list[dict]:
    return spec["spec"]["section"]["runSets"][0]["filters"]["filters"]


def write_sweep(root: Path, text: str = SWEEP) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.yaml").write_text(text)
    return root


def test_stage_workspaces_plot_exactly_their_registry():
    built = stage_workspaces("", "raytrain")
    assert set(built) == set(REGISTRY)
    for family, workspace in built.items():
        spec = workspace._spec
        plotted = line_metrics(spec)
        assert plotted <= REGISTRY[family], f"{family} plots unlogged keys {plotted - REGISTRY[family]}"
        assert REGISTRY[family] <= plotted, f"{family} never plots {REGISTRY[family] - plotted}"
        assert all(panel["config"]["xAxis"] == "_step" for panel in panels(spec))
        assert spec["displayName"].startswith("raytrain · ")


def test_stage_workspaces_show_the_runs_of_their_job_types():
    for family, workspace in stage_workspaces("", "raytrain").items():
        (only,) = runset_filters(workspace._spec)
        assert only["key"] == {"section": "run", "name": "jobType"}
        assert only["value"] in (list(JOB_TYPES[family]), JOB_TYPES[family][0])
    assert JOB_TYPES == {"pretrain": ("pretrain",), "finetune": ("sft", "reward", "dpo", "simpo", "orpo", "kto"),
                         "ppo": ("ppo",)}


def test_exported_specs_load_back_unchanged(tmp_path):
    sweep = write_sweep(tmp_path / "runs" / "lr-warmup")
    written = export_specs(tmp_path / "specs", "team", "raytrain", [sweep])
    assert [p.name for p in written] == ["pretrain.json", "finetune.json", "ppo.json", "sweep-lr-warmup.json"]
    assert not [p for p in (tmp_path / "specs").iterdir() if p not in written]  # no temp files left
    for path in written:
        spec = json.loads(path.read_text())
        assert load_spec(path)._spec == spec
    # Panel ids are stable: a second export writes the same bytes.
    again = export_specs(tmp_path / "again", "team", "raytrain", [sweep])
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in written]


def test_sweep_workspace_plots_each_searched_key_against_the_metric(tmp_path):
    spec = sweep_workspace("", "raytrain", write_sweep(tmp_path / "sweep"))._spec
    assert spec["displayName"] == "raytrain · sweep lr-warmup"
    scatters = {p["config"]["xAxis"]: p["config"] for p in panels(spec) if p["viewType"] == "Scatter Plot"}
    assert set(scatters) == {"config:train.value.lr", "config:train.value.warmup_steps",
                             "config:parallel.value.activation_checkpointing"}
    assert all(config["yAxis"] == "summary:val/loss" for config in scatters.values())
    assert scatters["config:train.value.lr"].get("xAxisLogScale") is True  # loguniform
    assert "xAxisLogScale" not in scatters["config:train.value.warmup_steps"]
    (parallel,) = [p["config"] for p in panels(spec) if p["viewType"] == "Parallel Coordinates Plot"]
    assert [c["accessor"] for c in parallel["columns"]] == [*scatters, "summary:val/loss"]
    assert "val/loss" in line_metrics(spec)
    assert runset_filters(spec) == [{"key": {"section": "run", "name": "group"}, "op": "=", "value": "lr-warmup",
                                     "disabled": False}]
    assert spec["spec"]["section"]["runSets"][0]["sort"]["keys"][0] == {
        "key": {"section": "summary", "name": "val/loss"}, "ascending": True}
    assert spec["spec"]["section"]["settings"]["maxRuns"] == 10  # 4 samples × 2 grid values, at least 10
    assert read_sweep(tmp_path / "sweep").trials == 8


def test_a_folder_without_sweep_yaml_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"is not a sweep folder \(no sweep.yaml\).*raytrain tune"):
        export_specs(tmp_path / "specs", "", "raytrain", [tmp_path])
    assert not (tmp_path / "specs").exists()  # nothing written
    with pytest.raises(ConfigError, match="is not a folder"):
        read_sweep(tmp_path / "missing")


@pytest.mark.parametrize("text, message", [
    ("name: [unclosed", "invalid YAML"),
    ("- a list", "expected a mapping"),
    (SWEEP.replace("metric: val/loss", "metric: val/los"), "not a metric raytrain logs"),
    (SWEEP.replace("mode: min", "mode: lowest"), "give min or max"),
    (SWEEP.replace("{randint: [0, 20]}", "[0, 20]"), "space.train.warmup_steps: give one distribution"),
    ("name: x\nmetric: val/loss\n", "'space' must map config keys"),
])
def test_a_malformed_sweep_yaml_names_the_file_and_the_fix(tmp_path, text, message):
    folder = write_sweep(tmp_path / "sweep", text)
    with pytest.raises(ConfigError, match=message) as info:
        read_sweep(folder)
    assert str(folder / "sweep.yaml") in str(info.value)


def test_publish_without_a_key_says_how_to_get_one(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    with pytest.raises(ConfigError) as info:
        publish("team", "raytrain", [])
    assert str(info.value) == NO_KEY
    assert "WANDB_API_KEY" in NO_KEY and "wandb login" in NO_KEY and "dashboards export --out DIR" in NO_KEY
    # What `wandb login` writes counts as a key (read, not checked online).
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    assert has_api_key()


def test_a_broken_spec_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"entity": "e"}')
    with pytest.raises(DataError, match="not a W&B workspace spec"):
        load_spec(path)
