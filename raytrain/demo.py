"""`raytrain demo`: the training chain on the stdlib corpus, on one machine, in minutes."""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
from collections import Counter
from pathlib import Path

from raytrain.config import Config
from raytrain.data.chat_data import reply, run_prefs_data_stage, run_sft_data_stage, user_turn
from raytrain.data.manifest import PreparedDataset
from raytrain.data.prepare import run_prepare_stage
from raytrain.data.stdlib_qa import STDLIB_PREFS, STDLIB_QA, is_val_module, stdlib_prefs, stdlib_qa
from raytrain.data.tokenizer import load_tokenizer
from raytrain.data.tokenizer_stage import run_tokenizer_stage
from raytrain.export.commands import export_onnx
from raytrain.inference import generate_from_checkpoint, score_conversations
from raytrain.report import write_report
from raytrain.rlhf.experience_source import SAMPLES_FILE
from raytrain.stages import STAGES
from raytrain.train.checkpoint import load_model
from raytrain.train.evaluate import unigram_baseline
from raytrain.train.metrics import METRICS_FILE

log = logging.getLogger("raytrain")
STEPS = 10
# Fine-tuning after pre-training: fewer steps, a gentler learning rate (the pre-training config's other keys hold).
SFT_STEPS, SFT_LR, SFT_WARMUP = 200, 1e-3, 10
# The reward model from the fine-tuned model: a lower learning rate (at 1e-3 it learns the train pairs and no
# better held-out ranking); one checkpoint at the end (each one scores the whole train split).
REWARD_STEPS, REWARD_LR, REWARD_WARMUP = 250, 3e-4, 10
# DPO from the fine-tuned model on the same preference rows, instead of a reward model and PPO.
DPO_STEPS, DPO_LR, DPO_WARMUP = 150, 3e-4, 10
PACKED = {"train.packing": True}
# PPO from the fine-tuned model against the reward model: a few hundred sampled answers; the adaptive KL
# coefficient holds the policy near the fine-tuned model (KL_TARGET nats per answer).
# (At lr 4e-4 with a slow controller the policy found that "." scores well: reward hacking, KL 15 nats.)
PPO_OVERRIDES = {"iterations": 20, "prompts_per_iteration": 16, "epochs": 2, "kl_coef": 0.1, "kl_target": 2.0,
                 "kl_horizon": 100, "val_prompts": 32, "drop_long_prompts": True, "async_rollouts": True}
PPO_LR = 2e-4
# The rollout engine of the PPO stage: the fastest one on this machine for the demo's model at 16 prompts
# (BENCHMARKS.md, rollout engines: ours 1,401 new tokens/s, vLLM's CPU build 1,035, transformers 909).
PPO_ENGINE, PPO_ENGINE_WHY = "native", "the fastest here for this model: BENCHMARKS.md, rollout engines"
KL_WINDOW = 5  # iterations the reported KL is averaged over (one iteration's 16 answers are a noisy estimate)


def demo_configs(config: Config) -> dict[str, Config]:
    """Each step's own config, built whole from the user's (configs are frozen: no stage's resolution reaches
    another's). Keys: the data steps (tokenizer, prepare, sft-data, prefs-data) and the stages."""
    base = config.run.dir
    pretrain = config.with_values({
        "run.root": str(base), "run.name": "pretrain",
        "data.tokenizer.out": str(base / "tokenizer"), "data.tokenizer.overwrite": True,
        "data.prepare.tokenizer": str(base / "tokenizer"), "data.prepare.out": str(base / "data"),
        "data.prepare.overwrite": True, "train.data": str(base / "data")})

    def chat_data(source: str, out: str) -> Config:
        return pretrain.with_values({"data.source.inputs": [source], "data.prepare.out": str(base / out)})

    def post_training(name: str, data: str, init: str, steps: int, lr: float, warmup: int) -> Config:
        """A post-training stage's run from `init`, one checkpoint at the end."""
        return pretrain.with_values({"run.name": name, "train.data": str(base / data), "train.init_from":
                                     str(base / init), "train.steps": steps, "train.lr": lr,
                                     "train.warmup_steps": warmup, "train.checkpoint_every": steps})

    ppo = pretrain.with_values({
        "run.name": "ppo", "ppo.rollout_engine": PPO_ENGINE, "train.lr": PPO_LR,
        "train.warmup_steps": 0, "train.log_every": 1, "train.val_every": 10,
        "train.checkpoint_every": PPO_OVERRIDES["iterations"], "ppo.policy": str(base / "sft"),
        "ppo.reward": str(base / "reward"), "ppo.prompts": STDLIB_QA,
        **{f"ppo.{key}": value for key, value in PPO_OVERRIDES.items()}})
    return {"tokenizer": pretrain, "prepare": pretrain, "pretrain": pretrain,
            "sft-data": chat_data(STDLIB_QA, "sft-data"),
            # Packed rows: each micro-batch's conversations (or responses) end to end, each attending to itself (the
            # loss of padded rows, fewer positions computed).
            "sft": post_training("sft", "sft-data", "pretrain", SFT_STEPS, SFT_LR, SFT_WARMUP).with_values(PACKED),
            "prefs-data": chat_data(STDLIB_PREFS, "prefs-data"),
            "reward": post_training("reward", "prefs-data", "sft", REWARD_STEPS, REWARD_LR,
                                    REWARD_WARMUP).with_values(PACKED),
            "dpo": post_training("dpo", "prefs-data", "sft", DPO_STEPS, DPO_LR, DPO_WARMUP).with_values(PACKED),
            "ppo": ppo}


def run_demo(config: Config) -> None:
    if config.run.task:
        from raytrain.demo_task import run_task_demo

        return run_task_demo(config)
    base = config.run.dir
    configs = demo_configs(config)
    tokenizer_dir, data_dir, train_run = base / "tokenizer", base / "data", base / "pretrain"
    sft_data_dir, sft_run = base / "sft-data", base / "sft"
    prefs_data_dir, reward_run, dpo_run = base / "prefs-data", base / "reward", base / "dpo"
    ppo_run, onnx_dir = base / "ppo", base / "onnx-int8"
    seed, val_fraction = config.data.prepare.seed, config.data.prepare.val_fraction

    def stage(name: str) -> dict:
        shutil.rmtree(base / name, ignore_errors=True)  # the demo starts fresh rather than resuming
        return STAGES[name].run(configs[name])

    log.info("demo [1/%d] tokenizer on %s", STEPS, ", ".join(config.data.source.inputs))
    run_tokenizer_stage(configs["tokenizer"])
    log.info("demo [2/%d] token shards", STEPS)
    run_prepare_stage(configs["prepare"])
    log.info("demo [3/%d] pre-training", STEPS)
    report_pretraining(stage("pretrain"), data_dir, train_run)

    log.info("demo [4/%d] fine-tuning data: %s", STEPS, STDLIB_QA)
    run_sft_data_stage(configs["sft-data"])
    log.info("demo [5/%d] supervised fine-tuning from the pre-trained model", STEPS)
    report_fine_tuning(stage("sft"), sft_run, seed, val_fraction)

    log.info("demo [6/%d] preference data: %s", STEPS, STDLIB_PREFS)
    run_prefs_data_stage(configs["prefs-data"])
    log.info("demo [7/%d] reward model from the fine-tuned model", STEPS)
    report_reward_model(stage("reward"), reward_run, seed, val_fraction)
    log.info("demo [8/%d] DPO from the fine-tuned model on the same preferences", STEPS)
    report_dpo(stage("dpo"))
    log.info("demo [9/%d] PPO from the fine-tuned model against the reward model (Ray actor pools; rollouts by the "
             "%s engine, %s)", STEPS, PPO_ENGINE, PPO_ENGINE_WHY)
    report_ppo(stage("ppo"), ppo_run)
    page = write_report([train_run, sft_run, reward_run, dpo_run, ppo_run], base / "report")
    log.info("demo [10/%d] the PPO policy → ONNX, int8, on onnxruntime", STEPS)
    print("\nexport:")
    export_onnx(str(ppo_run), str(onnx_dir), quantization="int8", data=str(sft_data_dir), overwrite=True)

    print(f"\ndemo outputs in {base}/")
    print(f"  tokenizer  {tokenizer_dir}/tokenizer.json  (with the chat template)")
    print(f"  datasets   {data_dir}/, {sft_data_dir}/, {prefs_data_dir}/  (manifest.json, train/ and val/ "
          "Parquet shards)")
    print(f"  runs       {train_run}/, {sft_run}/, {reward_run}/, {dpo_run}/, {ppo_run}/  (metrics.jsonl, "
          "summary.json, checkpoints/, wandb/; samples.jsonl for PPO)")
    print(f"  report     {page}  (plots of every stage's metrics and the summary tables; "
          f"`raytrain report RUN... --out DIR` for any runs)")
    print(f"  onnx       {onnx_dir}/  (prefill.onnx + decode.onnx sharing weights.bin, int8, tokenizer and "
          "raytrain-onnx.json: onnxruntime alone runs it)")
    print(f"  next       raytrain generate --chat --checkpoint {ppo_run} --prompt 'What does `os.path.join` do?'")
    print(f"             raytrain generate --chat --onnx {onnx_dir} --prompt 'What does `os.path.join` do?'")
    print(f"             raytrain score --checkpoint {reward_run} --prompt 'What does `os.path.join` do?' "
          "--response 'Join two or more pathname components.' --response 'Join two'")


def report_ppo(summary: dict, run: Path) -> None:
    before, after, final = summary["val_first"], summary["val_last"], summary["final"]
    records = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    kl = statistics.mean([r["ppo/kl"] for r in records if "ppo/kl" in r][-KL_WINDOW:])
    print(f"\nPPO: held-out reward (greedy answers, normalised reward-model score) {before['val/reward_mean']:+.3f} "
          f"→ {after['val/reward_mean']:+.3f} after {PPO_OVERRIDES['iterations']} iterations; KL to the fine-tuned "
          f"model {kl:.2f} nats per sampled answer over the last {KL_WINDOW} iterations (target "
          f"{PPO_OVERRIDES['kl_target']:.1f}, β {PPO_OVERRIDES['kl_coef']} → {final['ppo/kl_coef']:.3f}); held-out "
          f"answer length {before['val/response_len']:.1f} → {after['val/response_len']:.1f} tokens")
    waited = statistics.mean(r["perf/rollout_time_frac"] for r in records if "perf/rollout_time_frac" in r)
    print(f"  rollouts {final['perf/rollout_tokens_per_s']:,.0f} tokens/s on the actor pool "
          f"({summary['rollout_engine']} engine; after the last sync its greedy answers equal the checkpoint's on "
          f"{summary['rollout_greedy_agreement']:.0%} of held-out prompts), generated while the "
          f"learner trained (asynchronous, one iteration stale; the learner waited {waited:.0%} of an iteration), "
          f"weight sync {final['ppo/weight_sync_s'] * 1000:.0f} ms per iteration, wall {summary['wall_s']:.0f}s")
    monitors = sorted({key for r in records for key in r if key.startswith("health/")})
    fired = {key.removeprefix("health/"): [str(r["step"]) for r in records if r.get(key)] for key in monitors}
    print("  health monitors: " + (", ".join(f"{name} fired at step(s) {', '.join(steps)}"
                                             for name, steps in fired.items() if steps) or "none fired"))
    samples = [json.loads(line) for line in (run / SAMPLES_FILE).read_text().splitlines()]
    first = [s for s in samples if s["split"] == "val" and s["step"] == 0][0]
    last = [s for s in samples if s["split"] == "val" and s["prompt"] == first["prompt"]][-1]
    print(f"  a held-out question: {first['prompt']}")
    print(f"    before ({first['reward']:+.2f}): {first['response']}")
    print(f"    after  ({last['reward']:+.2f}): {last['response']}")


def report_pretraining(summary: dict, data_dir: Path, run: Path) -> None:
    before, after = summary["val_first"], summary["val_last"]
    unigram = unigram_baseline(PreparedDataset.open(data_dir))
    print(f"\npre-training: val loss {before['val/loss']:.3f} (ppl {before['val/ppl']:.0f}) → "
          f"{after['val/loss']:.3f} (ppl {after['val/ppl']:.1f}) after {summary['steps']} steps; "
          f"unigram baseline {unigram:.3f} (ppl {math.exp(unigram):.0f})")
    print(f"{summary['tokens_seen']:,.0f} tokens at {summary['tokens_per_s']:,.0f} tokens/s, "
          f"MFU {summary['final']['perf/mfu']:.1%}, wall {summary['wall_s']:.0f}s")
    generate_from_checkpoint(str(run), ["def ", "import "], max_new_tokens=48, temperature=0.7, top_k=40,
                             top_p=0.95, seed=0)


def report_fine_tuning(summary: dict, run: Path, seed: int, val_fraction: float) -> None:
    before, after = summary["val_first"], summary["val_last"]
    print(f"\nfine-tuning: held-out answer loss {before['val/loss']:.3f} (ppl {before['val/ppl']:.0f}) before → "
          f"{after['val/loss']:.3f} (ppl {after['val/ppl']:.1f}) after {summary['steps']} steps "
          f"(questions on modules never trained on), wall {summary['wall_s']:.0f}s; packed rows, "
          f"{summary['tokens_per_s']:,.0f} real tokens/s")
    held_out = next(p for p in stdlib_qa() if p.kind == "what_does" and is_val_module(p.module, seed, val_fraction))
    print(f"a held-out question; reference answer: {held_out.answer}")
    generate_from_checkpoint(str(run), [held_out.question], max_new_tokens=48, temperature=0.0, top_k=0,
                             top_p=1.0, seed=0, chat=True)


def report_reward_model(summary: dict, run: Path, seed: int, val_fraction: float) -> None:
    before, after = summary["val_first"], summary["val_last"]
    print(f"\nreward model: held-out pairwise accuracy {before['val/accuracy']:.3f} before → "
          f"{after['val/accuracy']:.3f} after {summary['steps']} steps (mean margin {after['val/margin']:.2f}, "
          f"loss {before['val/loss']:.3f} → {after['val/loss']:.3f}; prompts on modules never trained on), "
          f"wall {summary['wall_s']:.0f}s")
    model, meta = load_model(run)
    tokenizer = load_tokenizer(meta["tokenizer"]["path"])
    held_out = [p for p in stdlib_prefs() if is_val_module(p.module, seed, val_fraction)]
    scores = score_conversations(model, tokenizer, [[user_turn(p.prompt), reply(answer)] for p in held_out
                                                    for answer in (p.chosen, p.rejected)])
    right = Counter(p.kind for p, chosen, rejected in zip(held_out, scores[::2], scores[1::2], strict=True)
                    if chosen > rejected)
    kinds = Counter(p.kind for p in held_out)
    print("  by kind of wrong answer: " + ", ".join(
        f"{kind.replace('_', ' ')} {right[kind] / n:.2f} ({n} pairs)" for kind, n in sorted(kinds.items())))
    print("  the first held-out pair of each kind: true answer's score vs the wrong one's")
    for kind in sorted(kinds):
        i = next(i for i, p in enumerate(held_out) if p.kind == kind)
        chosen, rejected = scores[2 * i], scores[2 * i + 1]
        print(f"    {kind:<16} {chosen:+.2f} vs {rejected:+.2f} {'right' if chosen > rejected else 'wrong'}  "
              f"{held_out[i].prompt[:56]}  wrong answer: {held_out[i].rejected[:48]!r}")


def report_dpo(summary: dict) -> None:
    before, after = summary["val_first"], summary["val_last"]
    print(f"\nDPO: held-out DPO loss {before['val/loss']:.3f} (log 2: the model starts as its own reference) → "
          f"{after['val/loss']:.3f} after {summary['steps']} steps; its implicit reward β·(log π − log π_ref) ranks "
          f"the true answer first in {after['val/accuracy']:.1%} of held-out pairs (mean margin "
          f"{after['val/margin']:.2f}), wall {summary['wall_s']:.0f}s")
