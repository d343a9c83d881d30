"""A verifiable task end to end on Ray: the task's text and SFT pairs, SFT logging held-out exact-match accuracy,
`raytrain eval --task` agreeing with it, and GRPO with the task's verifier logging the same accuracy."""

import pytest
from conftest import metric

from raytrain.cli import main
from raytrain.config import load_config
from raytrain.data.chat_data import run_sft_data_stage
from raytrain.data.prepare import run_prepare_stage
from raytrain.data.sources import task_texts
from raytrain.data.tokenizer import save_tokenizer, train_tokenizer
from raytrain.stages import STAGES
from raytrain.train.local import run_local

TASK = "task:arith:1"  # the easiest level: one-digit sums and differences
STEPS = 300


@pytest.mark.ray
def test_a_task_chain_measures_held_out_accuracy_the_same_way_at_every_stage(ray_session, tmp_path, capsys):
    tokenizer = tmp_path / "tokenizer"
    save_tokenizer(train_tokenizer(task_texts(TASK), 400, split_digits=True), tokenizer, {})
    common = [f"run.root='{tmp_path}'", f"data.prepare.tokenizer='{tokenizer}'", "model.d_model=64",
              f"data.source.inputs=['{TASK}']", "data.prepare.seq_len=32", "train.global_batch=16",
              "train.lr=0.01", "train.val_every=100", f"train.checkpoint_every={STEPS}", "train.log_every=50"]

    def run(stage: str, data: str, *overrides: str):
        return run_local(load_config("tiny", [*common, f"run.name={stage}", f"train.data='{tmp_path / data}'",
                                              f"train.steps={STEPS}", *overrides]), STAGES[stage])

    run_prepare_stage(load_config("tiny", [*common, f"data.prepare.out='{tmp_path / 'text'}'"]))
    run("pretrain", "text")
    run_sft_data_stage(load_config("tiny", [*common, f"data.prepare.out='{tmp_path / 'pairs'}'"]))
    run("sft", "pairs", f"train.init_from='{tmp_path / 'pretrain'}'", "train.val_batches=2")
    accuracy = metric(tmp_path / "sft", "val/accuracy")  # val: the task's 20 held-out problems
    assert accuracy[0] == 0.0 and accuracy[STEPS] > 0.0, accuracy

    # Greedy decoding gets exactly the held-out replies the teacher-forced val/accuracy counted.
    capsys.readouterr()
    assert main(["eval", "--task", TASK, "--checkpoint", str(tmp_path / "sft"), "--samples", "4"]) == 0
    printed = capsys.readouterr().out
    assert "held-out exact-match accuracy (20 problems; chat" in printed and "pass@4" in printed
    greedy = float(printed.split("\n  all")[1].split()[1].rstrip("%")) / 100
    assert greedy == pytest.approx(accuracy[STEPS], abs=1e-6), printed
    assert main(["eval", "--task", TASK, "--checkpoint", str(tmp_path / "pretrain")]) == 0
    assert "text continuation" in capsys.readouterr().out  # a pre-trained model continues the problem's line

    grpo = STAGES["ppo"].run(load_config("tiny", [
        *common, "run.name=grpo", f"ppo.policy='{tmp_path / 'sft'}'", f"ppo.prompts='{TASK}'",
        "ppo.reward='python:raytrain.tasks.arith:reward'", "ppo.algorithm=grpo", "ppo.samples_per_prompt=8",
        "ppo.prompts_per_iteration=8", "ppo.iterations=4", "ppo.max_new_tokens=4", "ppo.val_prompts=20",
        "train.lr=0.001", "train.warmup_steps=0", "train.log_every=1", "train.val_every=4",
        "train.checkpoint_every=4"]))
    held_out = metric(tmp_path / "grpo", "val/accuracy")
    assert held_out[0] == pytest.approx(greedy) and sorted(held_out) == [0, 8], held_out  # 2 steps an iteration
    assert grpo["val_last"]["val/accuracy"] == grpo["val_last"]["val/reward_mean"] == held_out[8]
    rewards = metric(tmp_path / "grpo", "ppo/reward_mean")
    assert all(0 <= r <= 1 for r in rewards.values()) and len(rewards) == 4
