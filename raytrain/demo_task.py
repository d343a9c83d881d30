"""`raytrain demo --task NAME`: the chain on a verifiable task (raytrain/tasks/), each stage measured by exact-match
accuracy on held-out problems: tokenizer → pre-training on the task's text → SFT → GRPO with the task's verifier
as the reward → the same evaluation after each."""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time

import torch

from raytrain.config import Config
from raytrain.data.chat_data import run_sft_data_stage
from raytrain.data.prepare import run_prepare_stage
from raytrain.data.tokenizer import load_tokenizer
from raytrain.data.tokenizer_stage import run_tokenizer_stage
from raytrain.model.transformer import Transformer
from raytrain.report import write_report
from raytrain.stages import STAGES
from raytrain.tasks import TASK_SOURCE, load_task
from raytrain.tasks.evaluate import majority_baseline, task_accuracy
from raytrain.train.checkpoint import load_model
from raytrain.train.metrics import METRICS_FILE

log = logging.getLogger("raytrain")
STEPS = 7
# The task's model: digits one token each, a small vocabulary (the task's text needs few merges).
TOKENIZER = {"data.tokenizer.vocab_size": 384, "data.tokenizer.split_digits": True, "model.vocab_size": 384}
# Pre-training on the train problems' text, then SFT on their question–answer pairs in large batches (a step of 16
# short replies teaches little).
PRETRAIN = {"train.steps": 400, "train.lr": 3e-3, "train.warmup_steps": 20, "train.val_every": 200,
            "train.log_every": 50, "train.checkpoint_every": 400}
DEMO_LEVELS = 2  # without levels named, the task's easiest two: what a model this small learns in minutes
SFT = {"train.steps": 400, "train.global_batch": 128, "train.lr": 3e-3, "train.warmup_steps": 10,
       "train.val_every": 100, "train.log_every": 50, "train.checkpoint_every": 400, "train.packing": True}
# DAPO (GRPO with dynamic sampling: groups whose samples all scored the same leave the loss) against the task's
# verifier, 16 samples per prompt so that most groups hold a right and a wrong reply.
GRPO = {"ppo.algorithm": "dapo", "ppo.iterations": 30, "ppo.prompts_per_iteration": 8, "ppo.samples_per_prompt": 16,
        "ppo.max_new_tokens": 8, "ppo.epochs": 1, "ppo.minibatches": 2, "ppo.kl_coef": 0.01, "ppo.val_prompts": 256,
        "ppo.temperature": 1.0, "train.lr": 5e-5, "train.warmup_steps": 0, "train.log_every": 1,
        "train.val_every": 10, "train.checkpoint_every": 30}
EVAL_SAMPLES = 4  # pass@1 and pass@4 from this many sampled replies per held-out problem
SHOWN = 4  # held-out problems printed with their replies before and after


def task_configs(config: Config) -> dict[str, Config]:
    base, source = config.run.dir, task_source(config.run.task)
    pretrain = config.with_values({
        "run.root": str(base), "run.name": "pretrain", "data.source.inputs": [source],
        "data.tokenizer.out": str(base / "tokenizer"), "data.tokenizer.overwrite": True,
        "data.prepare.tokenizer": str(base / "tokenizer"), "data.prepare.out": str(base / "data"),
        "data.prepare.overwrite": True, "train.data": str(base / "data"), **TOKENIZER, **PRETRAIN})
    sft = pretrain.with_values({"run.name": "sft", "data.prepare.out": str(base / "sft-data"),
                                "train.data": str(base / "sft-data"), "train.init_from": str(base / "pretrain"),
                                **SFT})
    grpo = pretrain.with_values({"run.name": "grpo", "ppo.policy": str(base / "sft"), "ppo.prompts": source,
                                 "ppo.reward": f"python:{load_task(source).module.__name__}:reward", **GRPO})
    return {"tokenizer": pretrain, "prepare": pretrain, "pretrain": pretrain, "sft-data": sft, "sft": sft,
            "grpo": grpo}


def task_source(name: str) -> str:
    """task:NAME:LEVELS as given, or with the task's easiest DEMO_LEVELS levels."""
    if ":" in name.removeprefix(TASK_SOURCE):
        return TASK_SOURCE + name.removeprefix(TASK_SOURCE)
    levels = load_task(name).levels[:DEMO_LEVELS]
    return f"{TASK_SOURCE}{name.removeprefix(TASK_SOURCE)}:{','.join(map(str, levels))}"


def run_task_demo(config: Config) -> None:
    base, task = config.run.dir, load_task(task_source(config.run.task))
    configs = task_configs(config)
    print(f"task {task.name} (levels {', '.join(map(str, task.levels))}): {len(task.split(False))} train and "
          f"{len(task.split(True))} held-out problems; a correct reply is {task.answer_format}")

    def stage(name: str, key: str) -> dict:
        shutil.rmtree(base / key, ignore_errors=True)
        return STAGES[name].run(configs[key])

    log.info("task demo [1/%d] tokenizer on %s's text", STEPS, task.name)
    run_tokenizer_stage(configs["tokenizer"])
    tokenizer = load_tokenizer(base / "tokenizer")
    torch.manual_seed(configs["pretrain"].train.seed)
    untrained = Transformer(configs["pretrain"].model)
    answer, majority = majority_baseline(task)
    table = [("untrained model", evaluate(untrained, tokenizer, task, chat=True), 0.0),
             (f"majority answer ({answer!r})", {"greedy": majority}, 0.0)]
    log.info("task demo [2/%d] token shards", STEPS)
    run_prepare_stage(configs["prepare"])
    log.info("task demo [3/%d] pre-training on the task's text (train problems with their answers)", STEPS)
    summary = stage("pretrain", "pretrain")
    table.append(("pre-trained (continues the problem's line)", evaluate_run(base / "pretrain", task, chat=False),
                  summary["wall_s"]))
    log.info("task demo [4/%d] SFT data: the task's question–answer pairs", STEPS)
    run_sft_data_stage(configs["sft-data"])
    log.info("task demo [5/%d] supervised fine-tuning", STEPS)
    summary = stage("sft", "sft")
    before = replies(base / "sft", task)
    table.append(("SFT", evaluate_run(base / "sft", task, chat=True), summary["wall_s"]))
    log.info("task demo [6/%d] GRPO with the task's verifier as the reward (Ray actor pools)", STEPS)
    summary = stage("ppo", "grpo")
    table.append(("GRPO", evaluate_run(base / "grpo", task, chat=True), summary["wall_s"]))
    log.info("task demo [7/%d] held-out accuracy after each stage", STEPS)
    print_table(task, table)
    report_grpo(base / "grpo", summary)
    print_replies(task, before, replies(base / "grpo", task))
    page = write_report([base / "pretrain", base / "sft", base / "grpo"], base / "report")
    print(f"\nruns in {base}/ (pretrain, sft, grpo); report {page}")
    levels = ",".join(map(str, task.levels))
    print(f"  next: raytrain eval --task {task.name}:{levels} --checkpoint {base / 'grpo'} --samples 8")


def evaluate(model, tokenizer, task, chat: bool) -> dict[str, float]:
    start = time.perf_counter()
    result = task_accuracy(model, tokenizer, task, chat=chat, samples=EVAL_SAMPLES)
    log.info("held-out accuracy: greedy %.3f, pass@1 %.3f (%.0fs)", result["greedy"], result["pass@1"],
             time.perf_counter() - start)
    return result


def evaluate_run(run, task, chat: bool) -> dict[str, float]:
    model, meta = load_model(run)
    return evaluate(model, load_tokenizer(meta["tokenizer"]["path"]), task, chat)


def replies(run, task) -> list[str]:
    from raytrain.inference import generate_texts

    model, meta = load_model(run)
    return generate_texts(model, load_tokenizer(meta["tokenizer"]["path"]),
                          [p.prompt for p in task.split(True)[:SHOWN]], chat=True, max_new_tokens=16,
                          temperature=0.0, top_k=0, top_p=1.0)


def print_table(task, table) -> None:
    levels = [f"level {level}" for level in task.levels]
    print(f"\nheld-out exact-match accuracy ({task.name}; {len(task.split(True))} problems never trained on; "
          f"pass@k over {EVAL_SAMPLES} samples at temperature 1)")
    print(f"  {'model':<44} {'greedy':>7} {'pass@1':>7} {f'pass@{EVAL_SAMPLES}':>7}  "
          + "  ".join(f"{name:>8}" for name in levels) + "   wall")
    for name, result, wall in table:
        cells = [result.get(key) for key in ("greedy", "pass@1", f"pass@{EVAL_SAMPLES}")]
        cells += [result.get(f"{level}/greedy") for level in levels]
        print(f"  {name:<44} " + " ".join(f"{c:>7.1%}" if c is not None else f"{'':>7}" for c in cells[:3]) + "  "
              + "  ".join(f"{c:>8.1%}" if c is not None else f"{'':>8}" for c in cells[3:])
              + (f"  {wall:>4.0f}s" if wall else ""))


def report_grpo(run, summary: dict) -> None:
    records = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    kl = [r["ppo/kl"] for r in records if "ppo/kl" in r]
    equal = [r["ppo/equal_reward_groups"] for r in records if "ppo/equal_reward_groups" in r]
    rewards = [r["ppo/reward_mean"] for r in records if "ppo/reward_mean" in r]
    print(f"\nGRPO: train reward (share of sampled replies correct) {statistics.mean(rewards[:5]):.3f} over the first "
          f"5 iterations → {statistics.mean(rewards[-5:]):.3f} over the last 5; groups with all-equal rewards (no "
          f"advantage) {statistics.mean(equal[:5]):.0%} → {statistics.mean(equal[-5:]):.0%}; KL to the SFT model "
          f"{statistics.mean(kl[-5:]):.3f} nats per reply; held-out reply length "
          f"{summary['val_first']['val/response_len']:.1f} → {summary['val_last']['val/response_len']:.1f} tokens")


def print_replies(task, before: list[str], after: list[str]) -> None:
    print("  held-out problems, the SFT model's reply → GRPO's:")
    for p, old, new in zip(task.split(True), before, after, strict=False):
        verdicts = ["right" if reply.strip() == p.answer else "wrong" for reply in (old, new)]
        print(f"    {p.prompt:<28} answer {p.answer:<8} SFT {old!r:<10} {verdicts[0]}   GRPO {new!r:<10} {verdicts[1]}")
