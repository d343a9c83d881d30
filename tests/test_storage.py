"""Input and output paths may be URIs: against a real S3-compatible server (moto's, started by the suite on
127.0.0.1), data prepared to S3, pre-training from it with its run folder and checkpoints on S3, resumed from S3,
and the run evaluated from S3."""

import json
from argparse import Namespace

import pytest
from conftest import STEPS, assert_same_curve, losses

from raytrain import storage
from raytrain.config import load_config
from raytrain.data.manifest import PreparedDataset
from raytrain.data.output import atomic_output_dir, local_output_dir
from raytrain.errors import DataError


def test_storage_on_s3_and_outputs_that_appear_only_when_complete(s3_bucket, tmp_path):
    root = f"{s3_bucket}/unit"
    storage.write_text(storage.join(root, "a/b.txt"), "hello")
    assert storage.read_text(f"{root}/a/b.txt") == "hello" and storage.is_file(f"{root}/a/b.txt")
    assert storage.exists(f"{root}/a") and not storage.exists(f"{root}/none")
    assert storage.list_files(root) == ["a/b.txt"] and storage.list_files(f"{root}/none") == []
    storage.copy_tree(root, tmp_path / "down")
    assert (tmp_path / "down/a/b.txt").read_text() == "hello"
    storage.copy_tree(tmp_path / "down", f"{root}/up")
    assert storage.list_files(f"{root}/up") == ["a/b.txt"]
    assert storage.join("s3://b/x/", "y", "z") == "s3://b/x/y/z" and storage.absolute("s3://b/x/") == "s3://b/x"

    out = f"{root}/out"
    with atomic_output_dir(out, "done.json", overwrite=False) as staging:
        storage.write_text(storage.join(staging, "part"), "1")
        assert storage.list_files(out) == []  # nothing at out until the marker is written and copied last
        storage.write_text(storage.join(staging, "done.json"), "{}")
    assert storage.list_files(out) == ["done.json", "part"]
    with pytest.raises(DataError, match="already holds a finished result"), \
            atomic_output_dir(out, "done.json", overwrite=False):
        pass
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(out, "done.json", overwrite=True) as staging:
        storage.write_text(storage.join(staging, "other"), "2")
        raise RuntimeError("boom")
    assert storage.list_files(out) == ["done.json", "part"]  # a failed rewrite leaves the old result
    assert [f for f in storage.list_files(root) if ".tmp-" in f] == []  # and no staging behind
    storage.write_text(f"{root}/foreign/x", "")
    with pytest.raises(DataError, match="is not empty and holds no done.json"), \
            atomic_output_dir(f"{root}/foreign", "done.json", overwrite=True):
        pass
    with pytest.raises(DataError, match="is not a prepared dataset"):
        PreparedDataset.open(f"{root}/none")
    from raytrain.train.checkpoint import resolve_checkpoint

    with pytest.raises(DataError, match="'s3://raytrain/x' is neither a checkpoint nor a run folder"):
        resolve_checkpoint("s3://raytrain/x")
    with pytest.raises(DataError, match="--out of a report must be a local folder, not the URI 's3://b/r'; fix"):
        storage.require_local("s3://b/r", "--out of a report", "fix")

    # Writers that need a local folder (onnx) build there and upload; readers that need files get a local copy.
    with pytest.raises(RuntimeError, match="boom"), local_output_dir(f"{root}/onnx", "done.json", False) as local:
        (local / "model.onnx").write_text("x")
        raise RuntimeError("boom")
    assert storage.list_files(f"{root}/onnx") == []
    with local_output_dir(f"{root}/onnx", "done.json", False) as local:
        (local / "sub").mkdir()
        (local / "sub/model.onnx").write_text("x")
        (local / "done.json").write_text("{}")
    assert storage.list_files(f"{root}/onnx") == ["done.json", "sub/model.onnx"]
    with storage.local_copy(root, skip=("sub",)) as local:
        assert local.name == "unit" and (local / "onnx/done.json").is_file() and not (local / "onnx/sub").exists()
    assert not local.exists()
    storage.write_text(tmp_path / "new/file.txt", "local")  # locally: parents made, written whole by a rename
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["file.txt"]


@pytest.mark.ray
def test_prepare_to_s3_pretrain_from_it_and_resume_from_s3(s3_bucket, ray_session, corpus, tiny_tokenizer,
                                                           tiny_dataset, reference):
    from raytrain.commands import evaluate
    from raytrain.data.prepare import run_prepare_stage
    from raytrain.stages import STAGES

    data = f"{s3_bucket}/data"
    config = load_config("tiny", [f"data.source.inputs=['{corpus}']", f"data.prepare.tokenizer='{tiny_tokenizer}'",
                                  f"data.prepare.out='{data}'"])
    run_prepare_stage(config)
    local = json.loads((tiny_dataset / "manifest.json").read_text())
    on_s3 = PreparedDataset.open(data).manifest
    assert [s["rows"] for s in on_s3["splits"]["train"]["shards"]] == [
        s["rows"] for s in local["splits"]["train"]["shards"]]

    # A worker dies at step 12: the run resumes from its step-10 checkpoint on S3 and reproduces the reference.
    runs = f"{s3_bucket}/runs"
    summary = STAGES["pretrain"].run(load_config("tiny", [f"run.root='{runs}'", "run.name=on-s3",
                                                          f"train.data='{data}'", f"train.steps={STEPS}",
                                                          "train.micro_batches=2", "debug.fail_at_step=12",
                                                          "tracking.mode=offline"]))
    files = storage.list_files(f"{runs}/on-s3")
    for name in ("config.yaml", "metrics.jsonl", "summary.json", f"checkpoints/step_{STEPS:06d}/raytrain.json"):
        assert name in files, (name, files)
    assert any(f.startswith("wandb/") and f.endswith(".wandb") for f in files)
    assert summary["checkpoint"] == f"{runs}/on-s3/checkpoints/step_{STEPS:06d}"
    assert storage.read_text(f"{runs}/on-s3/.debug_failed_once") == "resumed from step 10\n"
    metrics = [json.loads(line) for line in storage.read_text(f"{runs}/on-s3/metrics.jsonl").splitlines()]
    ours = {r["step"]: r["train/loss"] for r in metrics if "train/loss" in r}
    assert_same_curve(losses(reference[0]), ours)
    # The run on S3 loads for the next command: its latest checkpoint, found and read from the URI.
    result = evaluate(Namespace(checkpoint=f"{runs}/on-s3", data=data, batches=2, batch_size=8))
    assert result["val/loss"] == pytest.approx(summary["val_last"]["val/loss"], rel=1e-5)


@pytest.mark.ray
def test_ppo_sweep_export_and_report_with_everything_on_s3(s3_bucket, ray_session, reference, tiny_dataset,
                                                           tmp_path, capsys):
    """PPO, a sweep, an ONNX export and a report, their inputs and outputs on S3 only: the PPO run survives a lost
    worker and a lost rollout actor (markers and checkpoints on S3), a rerun sweep resumes from S3."""
    from raytrain.cli import main

    root = f"{s3_bucket}/post"
    prompts = f"{root}/prompts.jsonl"
    storage.write_text(prompts, "".join(json.dumps({"prompt": f"What does {w} do?"}) + "\n"
                                        for w in ("len", "zip", "map", "sum", "min", "max", "abs", "iter") * 2))
    assert main(["ppo", "--config", "tiny", "--policy", str(reference[0]), "--prompts", prompts, "--name", "grpo",
                 "--reward", "python:raytrain.rlhf.rewards:brevity", "--algorithm", "grpo", "--iterations", "4",
                 "--workers", "1", f"run.root={root}", "ppo.samples_per_prompt=4", "ppo.prompts_per_iteration=4",
                 "ppo.minibatches=1", "ppo.max_new_tokens=8", "ppo.val_prompts=4", "ppo.samples_logged=2",
                 "train.log_every=1", "train.val_every=2", "train.checkpoint_every=2", "tracking.mode=offline",
                 "debug.fail_at_step=3", "debug.fail_actor_at_iteration=1", "train.max_failures=1"]) == 0
    run = f"{root}/grpo"
    files = storage.list_files(run)
    for name in ("config.yaml", "prompts.json", "metrics.jsonl", "samples.jsonl", "summary.json",
                 "checkpoints/step_000004/raytrain.json", ".debug_failed_once", ".debug_rollout_actor_failed_once"):
        assert name in files, (name, files)
    assert any(f.startswith("wandb/") and f.endswith(".wandb") for f in files)
    steps = [json.loads(line)["step"] for line in storage.read_text(f"{run}/metrics.jsonl").splitlines()]
    assert sorted(steps) == [0, 1, 2, 3, 4], steps  # those past the step-2 checkpoint dropped, logged again
    assert storage.read_text(f"{run}/.debug_failed_once") == "resumed from step 2\n"
    samples = [json.loads(line) for line in storage.read_text(f"{run}/samples.jsonl").splitlines()]
    per_step = [(s["step"], s["split"]) for s in samples]
    assert sorted(set(per_step)) == [(0, "val"), (1, "train"), (2, "train"), (2, "val"), (3, "train"), (4, "train"),
                                     (4, "val")]
    assert len(per_step) == 2 * len(set(per_step))  # ppo.samples_logged of each, once: also those logged again
    summary = json.loads(storage.read_text(f"{run}/summary.json"))
    assert summary["checkpoint"] == f"{run}/checkpoints/step_000004" and summary["rollout_weights_max_diff"] == 0.0

    # The PPO run exported from S3 to S3; the export on S3 generates what the checkpoint on S3 generates.
    assert main(["export", "onnx", run, "--out", f"{root}/onnx"]) == 0
    assert "raytrain-onnx.json" in storage.list_files(f"{root}/onnx")
    capsys.readouterr()
    prompt = ["--prompt", "What does len do?", "--chat", "--max-new-tokens", "8", "--temperature", "0"]
    assert main(["generate", "--checkpoint", run, *prompt]) == 0
    from_checkpoint = capsys.readouterr().out
    assert main(["generate", "--onnx", f"{root}/onnx", *prompt]) == 0
    assert capsys.readouterr().out == from_checkpoint

    # A sweep with its folder on S3 (Tune's state too); rerun, it resumes: nothing is trained again.
    space = f"{root}/space.yaml"
    storage.write_text(space, "train.lr: {grid: [1e-3, 3e-3]}\n")
    sweep = ["tune", "--stage", "pretrain", "--config", "tiny", "--space", space, "--name", "lr", "--samples", "1",
             "--scheduler", "none", f"run.root={root}", f"train.data={tiny_dataset}", "train.steps=10",
             "train.checkpoint_every=5", "train.val_every=5", "train.log_every=5", "tracking.mode=offline"]
    assert main(sweep) == 0
    trials = storage.read_text(f"{root}/lr/trials.csv")
    assert trials.count("completed") == 2 and f"{root}/lr/trial_000" in trials, trials
    logged = {name: storage.read_text(f"{root}/lr/{name}") for name in storage.list_files(f"{root}/lr")
              if name.endswith("metrics.jsonl")}
    assert len(logged) == 2
    assert main(sweep) == 0
    assert {name: storage.read_text(f"{root}/lr/{name}") for name in logged} == logged
    best = load_config(f"{root}/lr/best.yaml")
    assert (best.run.root, best.run.name, best.train.steps) == (root, "lr-best", 10)

    # The report reads runs and sweeps from S3 (their logs only) into a local page.
    assert main(["report", run, f"{root}/lr", "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "grpo" in page and "trial_001" in page
