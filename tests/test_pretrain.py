"""Pre-training on Ray Train: layout parity, resume, fault tolerance, eval/generate/convert."""

import json
from argparse import Namespace

import pytest
import ray.train
import torch
from conftest import STEPS, assert_same_curve, losses, pretrain

pytestmark = pytest.mark.ray


def test_reference_run_writes_the_run_folder(reference):
    run_dir, summary = reference
    curve = losses(run_dir)
    assert curve[STEPS] < curve[1] - 0.3  # it learns
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    from raytrain.stages import STAGES

    last = records[-1]
    assert set(STAGES["pretrain"].metrics) <= set(last) and last["step"] == STEPS
    assert records[0]["step"] == 0 and "val/loss" in records[0]  # validation before training
    assert 0 < last["perf/mfu"] < 1 and last["perf/tokens_per_s"] > 0
    assert summary["steps"] == STEPS and summary["tokens_seen"] == STEPS * 8 * 32
    assert (run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file()
    steps_kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert steps_kept == ["step_000010", "step_000020"]
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_the_same_loop_in_one_plain_process_matches_ray_train(reference, tiny_dataset, tmp_path):
    """The real Worker without Ray Train (train/local.py: batches read in-process, checkpoints copied into the run
    folder) gives the reference's losses and weights; a rerun resumes from its checkpoint."""
    from conftest import metric

    from raytrain.config import load_config
    from raytrain.stages import STAGES
    from raytrain.train.checkpoint import load_model
    from raytrain.train.local import run_local

    def local(steps):
        config = load_config("tiny", [f"run.root='{tmp_path}'", "run.name=local", f"train.data='{tiny_dataset}'",
                                      f"train.steps={steps}", "train.micro_batches=2", "tracking.mode=disabled"])
        return run_local(config, STAGES["pretrain"])

    import shutil

    local(STEPS)
    shutil.rmtree(tmp_path / "local" / "checkpoints" / "step_000020")  # as if it had stopped after step 10
    summary = local(STEPS)  # resumes at step 10
    assert summary["checkpoint"].endswith("step_000020") and summary["steps"] == STEPS
    assert losses(reference[0]) == pytest.approx(losses(tmp_path / "local"), rel=1e-6, abs=0)
    assert metric(reference[0], "val/loss") == pytest.approx(metric(tmp_path / "local", "val/loss"), rel=1e-6)
    assert sorted(p.name for p in (tmp_path / "local" / "checkpoints").iterdir()) == ["step_000010", "step_000020"]
    ours, _ = load_model(tmp_path / "local")
    theirs, _ = load_model(reference[0])
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=1e-6, atol=1e-7)


def test_two_fsdp_workers_match_one(reference, tiny_dataset, tmp_path):
    pretrain(tmp_path, "fsdp2", tiny_dataset, "parallel.workers=2")  # dp_shard inferred: 2
    assert_same_curve(losses(reference[0]), losses(tmp_path / "fsdp2"))


def test_tensor_and_data_parallel_with_activation_checkpointing_match_one(reference, tiny_dataset, tmp_path):
    # 4 workers on a 2-core machine: half a CPU each leaves room for the Ray Data readers.
    # Plain Megatron TP here (the other tp layouts run with sequence and loss parallel, the default).
    pretrain(tmp_path, "dp2tp2", tiny_dataset, "parallel.workers=4", "parallel.tp=2",
             "parallel.cpus_per_worker=0.5", "parallel.activation_checkpointing=full",
             "parallel.sequence_parallel=false", "parallel.loss_parallel=false")
    assert_same_curve(losses(reference[0]), losses(tmp_path / "dp2tp2"))


def test_crashed_tensor_parallel_run_resumes_on_one_worker(reference, tiny_dataset, tmp_path):
    with pytest.raises(ray.train.TrainingFailedError):
        pretrain(tmp_path, "crash", tiny_dataset, "parallel.workers=2", "parallel.tp=2",
                 "train.max_failures=0", "debug.fail_at_step=13", "debug.fail_rank=1")
    # Same name, one worker now: continues from the tp=2 checkpoint at step 10, resharded by DCP.
    pretrain(tmp_path, "crash", tiny_dataset, "parallel.workers=1")
    assert_same_curve(losses(reference[0]), losses(tmp_path / "crash"))


def test_killed_worker_costs_only_steps_since_checkpoint(reference, tiny_dataset, tmp_path):
    pretrain(tmp_path, "faulty", tiny_dataset, "parallel.workers=2", "parallel.dp_replicate=2",  # DDP
             "train.max_failures=1", "debug.fail_at_step=13", "debug.fail_rank=1")
    assert (tmp_path / "faulty" / ".debug_failed_once").read_text() == "resumed from step 10\n"
    assert_same_curve(losses(reference[0]), losses(tmp_path / "faulty"))


def test_eval_generate_and_convert_from_the_run(reference, tiny_dataset, tmp_path, capsys):
    from raytrain.commands import convert_from_hf, convert_to_hf, evaluate, generate
    from raytrain.train.checkpoint import load_model

    run_dir, summary = reference
    result = evaluate(Namespace(checkpoint=str(run_dir), onnx=None, data=str(tiny_dataset), batches=2, batch_size=8))
    assert result["val/loss"] == pytest.approx(summary["val_last"]["val/loss"], rel=1e-5)

    texts = generate(Namespace(checkpoint=str(run_dir), prompt=["def ", "import"], tokenizer=None,
                               max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=0, chat=False, system=None))
    assert len(texts) == 2 and "--- 'def '" in capsys.readouterr().out

    convert_to_hf(Namespace(checkpoint=str(run_dir), out=str(tmp_path / "hf"), merge=False))
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf")).eos_token == "<|eos|>"
    ours, _ = load_model(run_dir)
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), atol=1e-5, rtol=0)
    convert_from_hf(Namespace(hf_dir=str(tmp_path / "hf"), out=str(tmp_path / "back")))
    back, meta = load_model(tmp_path / "back")
    assert meta["step"] == 0
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values(), strict=True))
