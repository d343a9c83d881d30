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
from raytrain.data.output import atomic_output_dir
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
    with pytest.raises(DataError, match="run.root of a sweep 's3://b/runs' is a URI; it must be a local"):
        storage.require_local("s3://b/runs", "run.root of a sweep")


@pytest.mark.ray
def test_prepare_to_s3_pretrain_from_it_and_resume_from_s3(s3_bucket, ray_session, corpus, tiny_tokenizer,
                                                           tiny_dataset, reference):
    from raytrain.data.prepare import run_prepare_stage
    from raytrain.model_commands import evaluate
    from raytrain.train.launch import run_pretrain

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
    summary = run_pretrain(load_config("tiny", [f"run.root='{runs}'", "run.name=on-s3", f"train.data='{data}'",
                                                f"train.steps={STEPS}", "train.micro_batches=2",
                                                "debug.fail_at_step=12", "tracking.mode=offline"]))
    files = storage.list_files(f"{runs}/on-s3")
    for name in ("config.yaml", "metrics.jsonl", "summary.json", f"checkpoints/step_{STEPS:06d}/raytrain.json"):
        assert name in files, (name, files)
    assert any(f.startswith("wandb/") and f.endswith(".wandb") for f in files)
    assert summary["checkpoint"] == f"{runs}/on-s3/checkpoints/step_{STEPS:06d}"
    metrics = [json.loads(line) for line in storage.read_text(f"{runs}/on-s3/metrics.jsonl").splitlines()]
    ours = {r["step"]: r["train/loss"] for r in metrics if "train/loss" in r}
    assert_same_curve(losses(reference[0]), ours)
    # The run on S3 loads for the next command: its latest checkpoint, found and read from the URI.
    result = evaluate(Namespace(checkpoint=f"{runs}/on-s3", data=data, batches=2, batch_size=8))
    assert result["val/loss"] == pytest.approx(summary["val_last"]["val/loss"], rel=1e-5)
