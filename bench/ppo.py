"""PPO: iteration time against TRL's PPOTrainer, rollout throughput with 2 actors against 1, and weight sync's
share of an iteration, side by side in one run.

The same models on both sides: a randomly initialised policy of the demo architecture (speed does not depend
on the weights), its copy as the reference, and a reward model of the same architecture that is also the value
model's start; the same prompts (`stdlib-qa` questions), batch, response length and one PPO epoch of one
minibatch, fp32. raytrain runs `raytrain ppo` (one Ray Train worker, one rollout and one reward actor); TRL
runs `trl.experimental.ppo.PPOTrainer` in this process. Times are medians over the iterations after warm-up.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raytrain.config import load_config
from raytrain.data.stdlib_qa import STDLIB_QA
from raytrain.data.tokenizer import load_tokenizer, tokenizer_hash
from raytrain.model.transformer import Transformer
from raytrain.train.checkpoint import save_model

THREADS = 2
ITERATIONS = 8
WARMUP = 2  # iterations left out
BATCH = 16  # prompts per iteration
RESPONSE = 32  # new tokens per response
ROLLOUT_BATCH = 16  # samples per generate call in the rollout-scaling rows


def models(work: Path, config) -> tuple[Path, Path]:
    """The policy and reward checkpoints (random weights), with the tokenizer's identity in their metadata."""
    tokenizer = {"path": f"{work}/tok", "sha256": tokenizer_hash(f"{work}/tok")}
    common = {"step": 0, "mask_fraction": 0.15, "seed": 0, "tokenizer": tokenizer}
    policy = Transformer(config.model)
    policy.init_weights(0)
    save_model(work / "policy", policy, {**common, "objective": "sft"})
    reward = Transformer(config.model, head="score")
    reward.init_weights(1)
    save_model(work / "reward", reward, {**common, "objective": "reward",
                                         "reward": {"mean": 0.0, "std": 1.0, "responses": 1}})
    return work / "policy", work / "reward"


def ours(work: Path, base: list[str], name: str, *overrides: str) -> list[dict]:
    from raytrain.stages import STAGES

    STAGES["ppo"].run(load_config("demo", [*base, f"run.name={name}", *overrides]))
    records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "perf/iteration_s" in r and r["step"] > WARMUP]


def trl_iteration_time(work: Path, prompts: list[list[int]]) -> float:
    """Median seconds between TRL PPO updates (one rollout + one epoch) after warm-up."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from raytrain.export.hf import checkpoint_to_hf

    checkpoint_to_hf(str(work / "policy"), str(work / "hf-policy"))
    checkpoint_to_hf(str(work / "reward"), str(work / "hf-reward"))
    tokenizer = AutoTokenizer.from_pretrained(work / "hf-policy", padding_side="left")  # prompts end together

    def lm():
        return LlamaForCausalLM.from_pretrained(work / "hf-policy", dtype=torch.float32, attn_implementation="sdpa")

    def scorer():
        return LlamaForSequenceClassification.from_pretrained(work / "hf-reward", dtype=torch.float32,
                                                              attn_implementation="sdpa")

    ends: list[float] = []

    class IterationTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    data = datasets.Dataset.from_dict({"input_ids": prompts[: ITERATIONS * BATCH]})
    args = PPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                     num_mini_batches=1, num_ppo_epochs=1, response_length=RESPONSE, total_episodes=ITERATIONS * BATCH,
                     local_rollout_forward_batch_size=BATCH, learning_rate=1e-5, temperature=1.0, stop_token="eos",
                     kl_coef=0.1, use_cpu=True, report_to=[], num_sample_generations=0, save_strategy="no", seed=0,
                     disable_tqdm=True, gradient_checkpointing=False, dataloader_num_workers=0)
    PPOTrainer(args=args, processing_class=tokenizer, model=lm(), ref_model=lm(), reward_model=scorer(),
               value_model=scorer(), train_dataset=data, eval_dataset=data,
               callbacks=[IterationTimes()]).train()
    return statistics.median(np.diff(ends[WARMUP - 1:]))


def run() -> str:
    import ray

    from raytrain.data.tokenizer_stage import run_tokenizer_stage
    from raytrain.rlhf.prompts import load_prompts

    torch.set_num_threads(THREADS)
    ray.shutdown()  # a Ray of its own with room for the actors beside the worker (runtime.num_cpus below)
    work = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    try:
        # 8 logical CPUs on 2 cores: the learner waits while the actors generate, so each side gets 2 threads.
        runtime = ["runtime.progress=false", "runtime.address=local", "runtime.num_cpus=8"]
        config = load_config("demo", [f"data.tokenizer.out='{work}/tok'", *runtime])
        run_tokenizer_stage(config)
        policy, reward = models(work, config)
        prompts = load_prompts(STDLIB_QA, load_tokenizer(work / "tok"), 0, 0.0).train
        prompts = [p for p in prompts if len(p) + RESPONSE <= config.model.max_seq_len]
        base = [f"run.root='{work}'", *runtime, "tracking.mode=disabled", f"ppo.policy='{policy}'",
                f"ppo.reward='{reward}'", f"ppo.prompts={STDLIB_QA}", "ppo.drop_long_prompts=true",
                f"ppo.iterations={ITERATIONS}", f"ppo.prompts_per_iteration={BATCH}",
                f"ppo.max_new_tokens={RESPONSE}", "ppo.epochs=1", "ppo.minibatches=1", "ppo.temperature=1.0",
                "ppo.val_prompts=0", "train.log_every=1", "train.val_every=0",
                f"train.checkpoint_every={ITERATIONS}", "train.lr=1e-5", "train.warmup_steps=0",
                f"parallel.cpus_per_worker={THREADS}"]
        one = ours(work, base, "one-actor", "ppo.rollout_actors=1", f"ppo.actor_cpus={THREADS}")
        trl_s = trl_iteration_time(work, prompts)
        # Rollout scaling: one thread per actor, 1 actor against 2, generating pieces of ROLLOUT_BATCH samples.
        scaling = [f"ppo.prompts_per_iteration={2 * BATCH}", f"ppo.rollout_batch={ROLLOUT_BATCH}", "ppo.actor_cpus=1"]
        single = ours(work, base, "rollout-1", "ppo.rollout_actors=1", *scaling)
        double = ours(work, base, "rollout-2", "ppo.rollout_actors=2", *scaling)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(records: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in records)

    ours_s = median(one, "perf/iteration_s")
    sync_share = median(one, "ppo/weight_sync_s") / ours_s
    rate_1, rate_2 = median(single, "perf/rollout_tokens_per_s"), median(double, "perf/rollout_tokens_per_s")
    return "\n".join([
        "## PPO (CPU)",
        "",
        f"The demo architecture (d_model {config.model.d_model}, {config.model.n_layers} layers, vocab "
        f"{config.model.vocab_size}), random weights; policy, reference, reward and value models; {BATCH} "
        f"`stdlib-qa` prompts per iteration, up to {RESPONSE} sampled tokens each, one PPO epoch of one minibatch, "
        f"fp32, {THREADS} threads per side; {ITERATIONS} iterations, medians after {WARMUP}. raytrain: `raytrain "
        "ppo`, one Ray Train worker and one rollout and one reward actor; TRL: `trl.experimental.ppo.PPOTrainer` "
        "(`bench/ppo.py`).",
        "",
        "| comparison | raytrain | baseline | ratio | goal |",
        "|---|---:|---:|---:|---:|",
        f"| (a) PPO iterations/s, one rollout actor vs TRL `PPOTrainer` | {1 / ours_s:.3f} | {1 / trl_s:.3f} | "
        f"**{trl_s / ours_s:.2f}×** | ≥ 1.0× |",
        f"| (b) rollout tokens/s, 2 actors vs 1 (one thread each; {2 * BATCH} prompts per iteration in pieces of "
        f"`ppo.rollout_batch={ROLLOUT_BATCH}`) | {rate_2:,.0f} | {rate_1:,.0f} | "
        f"**{rate_2 / rate_1:.2f}×** | ≥ 1.6× |",
        f"| (c) weight sync, share of an iteration ({median(one, 'ppo/weight_sync_s') * 1000:.0f} ms of "
        f"{ours_s:.2f} s) | {sync_share:.1%} | | | ≤ 5% |",
        "",
        "Generation tokens/s against `transformers` `generate` is row (d) of the training table.",
    ])
