"""`raytrain tune`: the search space's checks, the results files, and one ASHA sweep on the session's Ray."""

import csv
import struct
import time
from pathlib import Path

import pytest
import yaml
from conftest import metric

from raytrain.cli import main
from raytrain.config import load_config
from raytrain.errors import ConfigError
from raytrain.tune.results import BEST_FILE, STOPPED, TRIALS_FILE, best_row
from raytrain.tune.space import load_space, to_tune
from raytrain.tune.sweep import new_sweep, run_sweep


def space_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_space(path, load_config("tiny"))
    return str(error.value)


def test_space_errors_name_the_file_the_key_and_the_fix(tmp_path):
    assert "did you mean 'train.lr'" in space_error(tmp_path, "train.lrr: {loguniform: [1e-4, 1e-2]}")
    assert "is a config section" in space_error(tmp_path, "train: {choice: [1, 2]}")
    assert "range [0.01, 0.001] is empty" in space_error(tmp_path, "train.lr: {uniform: [1e-2, 1e-3]}")
    assert "loguniform needs low > 0" in space_error(tmp_path, "train.lr: {loguniform: [0, 1e-2]}")
    assert "use randint" in space_error(tmp_path, "train.steps: {uniform: [10, 20]}")
    assert "randint needs two integers" in space_error(tmp_path, "train.steps: {randint: [10, 20.5]}")
    assert "use choice or grid" in space_error(tmp_path, "train.precision: {uniform: [1, 2]}")
    message = space_error(tmp_path, "train.precision: {choice: [fp32, fp8]}")
    assert "space.yaml: train.precision: the value 'fp8' is not valid" in message and "fp32, bf16" in message
    assert "must be > 0" in space_error(tmp_path, "train.lr: {grid: [1e-3, -1.0]}")
    assert "give one distribution" in space_error(tmp_path, "train.lr: {normal: [0, 1]}")
    assert "maps config keys" in space_error(tmp_path, "[train.lr]")


def test_cli_refuses_a_bad_sweep_in_one_line_and_writes_nothing(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {loguniform: [1e-4, 1e-2]}\n")
    base = ["tune", "--stage", "pretrain", "--config", "tiny", "--space", str(space), "--name", "s",
            f"run.root='{tmp_path / 'runs'}'"]
    assert main(base) == 2  # no data
    assert main([*base, "--metric", "ppo/kl", "--mode", "min"]) == 2
    space.write_text("train.lr: {loguniform: [1e-2, 1e-4]}\n")
    assert main(base) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("raytrain: error:")]
    assert len(errors) == 3 and "train.data' is empty" in errors[0]
    assert "not a metric `raytrain pretrain` logs" in errors[1] and "range [0.01, 0.0001] is empty" in errors[2]
    assert not (tmp_path / "runs").exists()


def test_space_becomes_tune_domains(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("train.lr: {loguniform: [1e-4, 1e-2]}\ntrain.warmup_steps: {randint: [0, 5]}\n"
                    "train.weight_decay: {uniform: [0.0, 0.2]}\ntrain.precision: {choice: [fp32, bf16]}\n"
                    "train.micro_batches: {grid: [1, 2]}\n")
    space = load_space(path, load_config("tiny"))
    domains = to_tune(space)
    assert [type(domains[k]).__name__ for k in ("train.lr", "train.warmup_steps", "train.weight_decay")] == [
        "Float", "Integer", "Float"]
    assert domains["train.micro_batches"] == {"grid_search": [1, 2]}
    assert new_sweep("s", "reward", None, None, 2, "asha", space, 0).metric == "val/accuracy"
    with pytest.raises(ConfigError, match="--mode"):
        new_sweep("s", "pretrain", "perf/mfu", None, 2, "asha", space, 0)


def test_best_trial_is_the_lowest_final_metric_of_those_that_reported():
    rows = [{"trial": "a", "final": 2.0}, {"trial": "b", "final": ""}, {"trial": "c", "final": 1.5},
            {"trial": "d", "final": float("nan")}]
    assert best_row(rows, "min")["trial"] == "c"
    assert best_row(rows, "max")["trial"] == "a"
    assert best_row([{"trial": "a", "final": ""}], "min") is None


def wandb_run_record(run_dir: Path):
    """The run record (group, job type, config) of a trial's offline W&B run, read back from its .wandb file: a
    LevelDB-style log (7-byte file header; 32 KiB blocks of records: crc32, length, kind, then the bytes)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, pieces, block = path.read_bytes(), 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pieces, pos = pieces + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            if record.WhichOneof("record_type") == "run":
                return record.run
    raise AssertionError(f"no run record in {path}")


@pytest.mark.ray
def test_asha_sweep_stops_bad_trials_writes_results_frees_the_cluster_and_resumes(ray_session, tiny_dataset,
                                                                                   tmp_path):
    import ray

    space_file = tmp_path / "space.yaml"
    space_file.write_text("train.lr: {loguniform: [1e-5, 1e-2]}\n")
    config = load_config("tiny", [f"run.root='{tmp_path}'", "run.name=lr", f"train.data='{tiny_dataset}'",
                                  "train.steps=30", "tracking.mode=offline"])
    space = load_space(space_file, config)
    sweep = new_sweep("lr", "pretrain", None, None, 4, "asha", space, seed=0)
    groups_before = {k for k, g in ray.util.placement_group_table().items() if g["state"] != "REMOVED"}
    # Two at a time: the later trials reach each rung after the first two, so ASHA has results to cut them by.
    result = run_sweep(config, sweep, space, max_concurrent=2)

    with (tmp_path / "lr" / TRIALS_FILE).open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and len({row["train.lr"] for row in rows}) == 4
    assert any(row["status"] == STOPPED and int(row["steps"]) < 30 for row in rows)
    finals = {row["trial"]: float(row["final"]) for row in rows}
    best = min(finals, key=finals.get)
    assert result["best"]["trial"] == best
    for row in rows:  # each trial is a whole run folder; its metric is what its run logged
        assert {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints"} <= {
            p.name for p in Path(row["run_dir"]).iterdir()}
        val = metric(Path(row["run_dir"]), "val/loss")
        assert finals[row["trial"]] == pytest.approx(val[int(row["steps"])])
        assert float(row["best"]) == pytest.approx(min(v for step, v in val.items() if 0 < step <= int(row["steps"])))
    best_config = load_config(str(tmp_path / "lr" / BEST_FILE))
    assert best_config.train.lr == pytest.approx(float(next(r for r in rows if r["trial"] == best)["train.lr"]))
    assert (best_config.run.name, best_config.train.steps) == ("lr-best", 30)
    for row in rows:  # W&B: each trial (stopped ones too) a run grouped by sweep, stage as job type, its values
        run = wandb_run_record(Path(row["run_dir"]))
        assert (run.run_group, run.job_type) == ("lr", "pretrain")
        wandb_config = {item.key: yaml.safe_load(item.value_json) for item in run.config.update}
        train = wandb_config["train"].get("value", wandb_config["train"])
        assert train["lr"] == pytest.approx(float(row["train.lr"]))

    # No placement group outlives its trial; every CPU is free again.
    assert {k for k, g in ray.util.placement_group_table().items() if g["state"] != "REMOVED"} == groups_before
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]

    # Rerunning the sweep resumes it: finished trials are not run again.
    written = {row["trial"]: (Path(row["run_dir"]) / "metrics.jsonl").stat().st_mtime for row in rows}
    again = run_sweep(config, sweep, space, max_concurrent=2)
    assert again["best"]["trial"] == best
    assert {row["trial"]: (Path(row["run_dir"]) / "metrics.jsonl").stat().st_mtime for row in rows} == written
    with pytest.raises(ConfigError, match="another samples"):
        run_sweep(config, new_sweep("lr", "pretrain", None, None, 5, "asha", space, seed=0), space)
