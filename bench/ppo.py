"""PPO: iteration time against TRL's PPOTrainer, rollout throughput of 2 actors × 1 thread against 1 actor × 2
threads, weight sync's share of an iteration, asynchronous rollouts against synchronous ones, and weight-sync
time against model size, in one run.

The same models on both sides: a randomly initialised policy of the demo architecture (speed does not depend
on the weights), its copy as the reference, and a reward model of the same architecture that is also the value
model's start; the same prompts (`stdlib-qa` questions), batch, response length, generation in pieces of the
same size, and one PPO epoch of one minibatch; fp32 on both sides (TRL's PPOConfig defaults to bf16 autocast
even on the CPU: set off explicitly and read back), no activation checkpointing. raytrain runs `raytrain ppo`
(one Ray Train worker with 2 threads, one reward actor, and one rollout actor × 2 threads or two × 1 thread);
TRL runs `trl.experimental.ppo.PPOTrainer` in this process with 2 threads.

Each repeat runs ours (1 × 2), TRL, ours (2 × 1), then ours synchronous and asynchronous (`ppo.async_rollouts`,
`ppo.max_staleness=1`; learner and rollout actor 1 thread each, so each has a core) in turn. The statistic is the
same on both sides: the median, over the iterations after warm-up, of one iteration's wall time (ours:
`perf/iteration_s`, from the weight sync before the rollout to the end of the update; TRL: the time between
consecutive `on_step_end` callbacks, one per rollout + update).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.common import (
    CORPUS,
    SPREAD_NOTE,
    THREADS,
    TINY,
    Spread,
    curve,
    interleaved,
    phase,
    pick,
    ratio_cell,
    settings,
)
from raytrain.config import PPOConfig, load_config
from raytrain.data.stdlib_qa import STDLIB_QA
from raytrain.data.tokenizer import load_tokenizer, tokenizer_hash
from raytrain.model.transformer import Transformer
from raytrain.train.checkpoint import save_model

RAY_CPUS = 8  # logical CPUs of the section's Ray (bench/run.py): the learner's 2 and the actors'; the learner waits
# while the actors generate, so each side has the 2 cores to itself most of the time
ITERATIONS = pick(7, 3)
WARMUP = pick(2, 1)  # iterations left out of each run's median
BATCH = pick(16, 4)  # prompts per iteration
RESPONSE = pick(32, 8)  # new tokens per response
ROLLOUT_BATCH = BATCH // 2  # samples per generate call, both sides (ours: ppo.rollout_batch; TRL's chunks)
MODEL = pick([], ["model.d_model=48", "model.n_layers=2"])
SYNC_SIZES = pick([192, 768, 1536], [48, 96, 192])  # d_model of the weight-sync curve (4 layers, vocab 4096)
SYNC_REPEATS = pick(5, 2)  # syncs timed per size and side, interleaved, after one untimed each
SYNC_ACTORS = 2  # rollout actors × 1 thread the weight-sync curve sends to
STALENESS = 1  # (d): the asynchronous run's ppo.max_staleness
THREAD_REPEATS = pick(5, 1)  # in-process generate calls per thread count (the scaling row's diagnosis)
MIB = 2**20



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


def our_run(work: Path, base: list[str], name: str, *overrides: str) -> dict:
    """One `raytrain ppo` run: its records after warm-up (one per iteration) and the settings it ran with."""
    from raytrain.stages import STAGES

    with phase("ppo", f"raytrain ppo run {name}"):
        STAGES["ppo"].run(load_config("demo", [*base, f"run.name={name}", *overrides]))
    records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "perf/iteration_s" in r and r["step"] > WARMUP]
    assert len(records) == ITERATIONS - WARMUP, f"expected {ITERATIONS - WARMUP} iterations, got {len(records)}"
    resolved = yaml.safe_load((work / name / "config.yaml").read_text())
    shutil.rmtree(work / name, ignore_errors=True)
    train, parallel, ppo = resolved["train"], resolved["parallel"], resolved["ppo"]
    ran_with = settings(precision=train["precision"], learner_threads=int(parallel["cpus_per_worker"]),
                        async_rollouts=ppo["async_rollouts"], max_staleness=ppo["max_staleness"],
                        rollout_actors=ppo["rollout_actors"], reward_actors=ppo["reward_actors"],
                        threads_per_actor=max(1, int(ppo["actor_cpus"])), rollout_batch=ppo["rollout_batch"],
                        activation_checkpointing=parallel["activation_checkpointing"])

    def median(key: str) -> float:
        return statistics.median(r[key] for r in records)

    return {"iteration_s": median("perf/iteration_s"), "sync_s": median("ppo/weight_sync_s"),
            "rollout_tokens_per_s": median("perf/rollout_tokens_per_s"),
            "rollout_frac": median("perf/rollout_time_frac"), "response_len": median("ppo/response_len"),
            "settings": ran_with}


class TRLPPO:
    """TRL's PPOTrainer on the HF exports of the same checkpoints, built afresh for each run."""

    def __init__(self, work: Path, prompts: list[list[int]]):
        from raytrain.export.hf import checkpoint_to_hf

        self.work, self.prompts = work, prompts
        checkpoint_to_hf(str(work / "policy"), str(work / "hf-policy"))
        checkpoint_to_hf(str(work / "reward"), str(work / "hf-reward"))
        self.ran_with = ""

    def iteration_time(self) -> dict[str, float]:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        import datasets
        from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification, TrainerCallback
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        work = self.work
        tokenizer = AutoTokenizer.from_pretrained(work / "hf-policy", padding_side="left")  # prompts end together

        def lm():
            return LlamaForCausalLM.from_pretrained(work / "hf-policy", dtype=torch.float32,
                                                    attn_implementation="sdpa")

        def scorer():
            return LlamaForSequenceClassification.from_pretrained(work / "hf-reward", dtype=torch.float32,
                                                                  attn_implementation="sdpa")

        ends: list[float] = []
        threads: list[int] = []

        class IterationTimes(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                ends.append(time.perf_counter())
                threads.append(torch.get_num_threads())

        data = datasets.Dataset.from_dict({"input_ids": self.prompts[: ITERATIONS * BATCH]})
        args = PPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=BATCH,
                         gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1,
                         response_length=RESPONSE, total_episodes=ITERATIONS * BATCH,
                         local_rollout_forward_batch_size=ROLLOUT_BATCH, learning_rate=1e-5, temperature=1.0,
                         stop_token="eos", kl_coef=0.1, use_cpu=True, report_to=[], num_sample_generations=0,
                         save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0,
                         # TRL's defaults differ from ours: bf16 autocast (even on CPU), activation checkpointing.
                         bf16=False, fp16=False, gradient_checkpointing=False)
        with phase("ppo", "TRL PPOTrainer run"):
            trainer = PPOTrainer(args=args, processing_class=tokenizer, model=lm(), ref_model=lm(),
                                 reward_model=scorer(), value_model=scorer(), train_dataset=data, eval_dataset=data,
                                 callbacks=[IterationTimes()])
            trainer.train()
        assert len(ends) == ITERATIONS, f"TRL ran {len(ends)} iterations, not {ITERATIONS}"
        self.ran_with = settings(
            bf16=trainer.args.bf16, fp16=trainer.args.fp16, autocast=trainer.accelerator.mixed_precision,
            dtype=str(next(trainer.model.parameters()).dtype).removeprefix("torch."), threads=max(threads),
            gradient_checkpointing=trainer.args.gradient_checkpointing,
            local_rollout_forward_batch_size=trainer.args.local_rollout_forward_batch_size)
        return {"iteration_s": statistics.median(np.diff(ends[WARMUP - 1:]))}


def sync_times(d_model: int, actors: int, threads: int) -> tuple[dict[str, dict[str, Spread]], float]:
    """Per weight sync of a policy of this width into `actors` fresh rollout actors, by the learner's own
    WeightSender, interleaved: seconds and the sender's extra memory (MiB), streamed (default bucket) and through
    the object store; and the weights' MiB."""
    config = load_config("demo", [f"model.d_model={d_model}"]).model
    policy = Transformer(config)
    policy.init_weights(0)
    spreads = timed_syncs(policy, config, {"object store": {"streamed": False}, "streamed": {}}, actors, threads)
    return spreads, sum(p.numel() * p.element_size() for p in policy.parameters()) / MIB


def timed_syncs(policy, config, sides: dict[str, dict], actors: int, threads: int) -> dict[str, dict[str, Spread]]:
    """Syncs of `policy` into `actors` fresh rollout actors per side (WeightSender's options), after one untimed
    sync each (the actors start, the side group forms), interleaved: seconds and the sender's extra memory (MiB)."""
    import ray

    from raytrain.rlhf.actors import NAMESPACE, RolloutActor
    from raytrain.rlhf.weight_sync import WeightSender

    versions = itertools.count()
    pools, measures = [], {}
    for name, options in sides.items():
        pool = [RolloutActor.options(num_cpus=threads, namespace=NAMESPACE).remote(vars(config), threads)
                for _ in range(actors)]
        sender = WeightSender(policy, 0, pool, bucket_bytes=int(PPOConfig.sync_bucket_mb * MIB),
                              timeout_s=PPOConfig.sync_timeout_s, nccl=False, restarts=0, agree=lambda value: value,
                              **options)

        def measure(sender=sender) -> dict[str, float]:
            started = time.perf_counter()
            sender.sync(("bench", next(versions)))
            return {"s": time.perf_counter() - started, "peak_mib": sender.peak_bytes / MIB}
        pools.extend(pool)
        measures[name] = measure
    try:
        for measure in measures.values():
            measure()
        return interleaved(measures, SYNC_REPEATS)
    finally:
        for actor in pools:
            ray.kill(actor, no_restart=True)


def generate_thread_scaling(policy_path: Path, prompts: list[list[int]], stop: tuple, pad: int) -> dict[str, Spread]:
    """Seconds of one generate call of ROLLOUT_BATCH prompts in this process at 1 and at 2 threads, interleaved:
    how much a rollout actor gains from its second thread (the scaling row's ceiling on 2 cores)."""
    from raytrain.model.generate import generate
    from raytrain.train.checkpoint import load_model

    model, _ = load_model(policy_path)
    model.eval()
    batch = prompts[:ROLLOUT_BATCH]

    def timed(threads: int):
        def measure() -> dict[str, float]:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                started = time.perf_counter()
                generate(model, batch, RESPONSE, stop_ids=stop, pad_id=pad, temperature=1.0,
                         seeds=list(range(len(batch))))
                return {"s": time.perf_counter() - started}
            finally:
                torch.set_num_threads(before)
        return measure

    timed(THREADS)()  # warm-up
    spreads = interleaved({"1": timed(1), "2": timed(2)}, THREAD_REPEATS)
    return {threads: spreads[threads]["s"] for threads in spreads}


def run() -> str:
    from raytrain.data.tokenizer_stage import run_tokenizer_stage
    from raytrain.rlhf.prompts import load_prompts

    torch.set_num_threads(THREADS)
    work = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    names = itertools.count()
    try:
        runtime = ["runtime.progress=false"]
        config = load_config("demo", [f"data.tokenizer.out='{work}/tok'", *runtime, *MODEL])
        with phase("ppo", "tokenizer"):
            run_tokenizer_stage(load_config("demo", [f"data.tokenizer.out='{work}/tok'", *runtime, *CORPUS]))
        policy, reward = models(work, config)
        tokenizer = load_tokenizer(work / "tok")
        prompts = load_prompts(STDLIB_QA, tokenizer, 0, 0.0).train
        prompts = [p for p in prompts if len(p) + RESPONSE <= config.model.max_seq_len]
        base = [f"run.root='{work}'", *runtime, *MODEL, "tracking.mode=disabled", f"ppo.policy='{policy}'",
                f"ppo.reward='{reward}'", f"ppo.prompts={STDLIB_QA}", "ppo.drop_long_prompts=true",
                f"ppo.iterations={ITERATIONS}", f"ppo.prompts_per_iteration={BATCH}",
                f"ppo.max_new_tokens={RESPONSE}", "ppo.epochs=1", "ppo.minibatches=1", "ppo.temperature=1.0",
                f"ppo.rollout_batch={ROLLOUT_BATCH}", "ppo.reward_actors=1", "ppo.val_prompts=0",
                "ppo.samples_logged=0", "train.log_every=1", "train.val_every=0",
                f"train.checkpoint_every={ITERATIONS}", "train.lr=1e-5", "train.warmup_steps=0",
                "train.precision=fp32", "parallel.activation_checkpointing=none", "parallel.compile=false",
                f"parallel.cpus_per_worker={THREADS}"]
        trl = TRLPPO(work, prompts)
        notes: dict[str, str] = {}

        def ours(actors: int, threads: int, *overrides: str, label: str = ""):
            def measure() -> dict[str, float]:
                result = our_run(work, base, f"ppo-{actors}x{threads}-{next(names)}",
                                 f"ppo.rollout_actors={actors}", f"ppo.actor_cpus={threads}", *overrides)
                notes[label or f"{actors}x{threads}"] = result.pop("settings")
                return result
            return measure

        def baseline() -> dict[str, float]:
            result = trl.iteration_time()
            notes["trl"] = trl.ran_with
            return result

        # (a), (b), (c): ours 1 × 2, TRL, ours 2 × 1; (d) ours synchronous and asynchronous; in turn.
        one_core = ["parallel.cpus_per_worker=1", f"ppo.max_staleness={STALENESS}"]
        runs = interleaved({"1x2": ours(1, THREADS), "trl": baseline, "2x1": ours(2, 1),
                            "sync": ours(1, 1, *one_core, "ppo.async_rollouts=false", label="sync"),
                            "async": ours(1, 1, *one_core, "ppo.async_rollouts=true", label="async")})
        with phase("ppo", "generate thread scaling"):
            threads = generate_thread_scaling(policy, prompts, tuple(tokenizer.special["stop"]),
                                              tokenizer.special["pad"])
        # (d): weight sync against model size, streamed and through the object store, into 2 actors × 1 thread.
        with phase("ppo", "weight-sync curve"):
            syncs = {size: sync_times(size, SYNC_ACTORS, 1) for size in SYNC_SIZES}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    model = config.model
    one, two, base_trl = runs["1x2"], runs["2x1"], runs["trl"]
    sync_rate = Spread([1 / s for s in runs["sync"]["iteration_s"].values])
    async_rate = Spread([1 / s for s in runs["async"]["iteration_s"].values])
    ours_rate = Spread([1 / s for s in one["iteration_s"].values])
    trl_rate = Spread([1 / s for s in base_trl["iteration_s"].values])
    share = Spread([s / i for s, i in zip(one["sync_s"].values, one["iteration_s"].values, strict=True)])
    sync_ms = Spread([s * 1000 for s in one["sync_s"].values])
    rollout_1, rollout_2 = one["rollout_tokens_per_s"], two["rollout_tokens_per_s"]
    thread_gain = Spread([a / b for a, b in zip(threads["1"].values, threads["2"].values, strict=True)])

    sides = ["object store", "streamed"]
    sync_table = curve(
        "ppo-weight-sync", "PPO weight sync vs model size", "d_model", SYNC_SIZES,
        {side: [syncs[size][0][side]["s"].median * 1000 for size in SYNC_SIZES] for side in sides},
        "sync, ms", fmt="{:,.1f}",
        right={**{f"{side} extra memory": [syncs[size][0][side]["peak_mib"].median for size in SYNC_SIZES]
                  for side in sides}, "policy weights": [syncs[size][1] for size in SYNC_SIZES]}, right_label="MiB")
    sync_rows = [
        f"| d_model {size} ({syncs[size][1]:,.0f} MiB) | {_ms(syncs[size][0]['object store']['s'])} | "
        f"{_ms(syncs[size][0]['streamed']['s'])} | "
        f"{ratio_cell(syncs[size][0]['streamed']['s'], syncs[size][0]['object store']['s'], lower_is_better=True)} | "
        f"{syncs[size][0]['object store']['peak_mib'].cell('{:,.1f}')} | "
        f"{syncs[size][0]['streamed']['peak_mib'].cell('{:,.1f}')} |"
        for size in SYNC_SIZES]

    notes_a = (f"(a) {'goal met' if ours_rate.median >= trl_rate.median else 'short of the goal'}: of our "
               f"iteration, the rollout (generation and scoring, after the sync) took "
               f"{one['rollout_frac'].cell('{:.0%}')}, the weight sync {share.cell('{:.1%}')}, the rest is "
               "the old log-probs and values and the update on the learner.")
    notes_b = (f"(b) {'goal met' if rollout_2.median >= 1.6 * rollout_1.median else 'short of the goal'}: both "
               "layouts share this machine's 2 cores, so a second actor can only win what a second thread does "
               f"not. One generate call of {ROLLOUT_BATCH} prompts × {RESPONSE} tokens in this process took "
               f"{_ms(threads['1'])} ms on 1 thread and {_ms(threads['2'])} ms on 2, a speed-up of "
               f"{thread_gain.cell('{:.2f}')}×, which puts 2 × 1 against 1 × 2 near 2 ÷ {thread_gain.median:.2f} = "
               f"{2 / thread_gain.median:.2f}× if generating were all of it. Besides, the one reward actor (with "
               "`ppo.actor_cpus` threads in both layouts) scores the first piece while the next is generated, on "
               "the same cores.")
    notes_d = (f"(d) {'goal met' if async_rate.median >= 1.3 * sync_rate.median else 'short of the goal'}: the "
               "learner waited for the rollout (generation and scoring) for "
               f"{runs['sync']['rollout_frac'].cell('{:.0%}')} of a synchronous iteration and "
               f"{runs['async']['rollout_frac'].cell('{:.0%}')} of an asynchronous one, whose rollout was asked "
               "of the weights one iteration old while the learner trained (its first iteration, which waits, is "
               "warm-up). The two sides share the 2 cores with the reward actor, which scores each piece as it "
               "comes.")
    notes_c = (f"(c) {'goal met' if share.median <= 0.05 else 'short of the goal'}: the sync is "
               f"{sync_ms.cell('{:,.0f}')} ms per iteration at d_model {model.d_model}; the curve below shows "
               "how it grows with the model.")
    return "\n".join([
        "## PPO (CPU)",
        "",
        f"The demo architecture (d_model {model.d_model}, {model.n_layers} layers, vocab {model.vocab_size}), "
        "random weights; policy, reference, "
        f"reward and value models; {BATCH} `stdlib-qa` prompts per iteration, up to {RESPONSE} sampled tokens "
        f"each, generated in pieces of {ROLLOUT_BATCH} on both sides (ours: `ppo.rollout_batch`, TRL: "
        "`local_rollout_forward_batch_size`), one PPO epoch of one minibatch, fp32 on both sides, no activation "
        f"checkpointing; {ITERATIONS} iterations per run, the first {WARMUP} left out as warm-up. raytrain: "
        f"`raytrain ppo`, one Ray Train worker ({THREADS} threads), one reward actor, and the rollout actors "
        f"named in each row; TRL {_trl_version()}: `trl.experimental.ppo.PPOTrainer` in this process "
        f"({THREADS} threads) (`bench/ppo.py`).",
        "",
        f"Each repeat runs ours (1 rollout actor × {THREADS} threads), TRL, ours (2 rollout actors × 1 thread), "
        "ours synchronous and asynchronous (1 rollout actor × 1 thread, a 1-thread learner) in turn, each a fresh "
        "run. The statistic is the same on both sides: the median over the iterations "
        "after warm-up of one iteration's wall time (ours: `perf/iteration_s`, from the weight sync before the "
        "rollout to the end of the update; TRL: the time between consecutive `on_step_end` callbacks, one per "
        "rollout + update). Rollout tokens/s: response tokens ÷ the time from the first generate call to the "
        "last response (`perf/rollout_tokens_per_s`), median over the iterations after warm-up. " + SPREAD_NOTE,
        "",
        "| comparison | raytrain | baseline | ratio | goal |",
        "|---|---:|---:|---:|---:|",
        f"| (a) PPO iterations/s, 1 rollout actor × {THREADS} threads vs TRL `PPOTrainer` | "
        f"{ours_rate.cell('{:.3f}')} | {trl_rate.cell('{:.3f}')} | {ratio_cell(ours_rate, trl_rate)} | ≥ 1.0× |",
        f"| (b) rollout tokens/s, 2 actors × 1 thread vs 1 actor × {THREADS} threads ({BATCH} prompts per "
        f"iteration in pieces of `ppo.rollout_batch={ROLLOUT_BATCH}`) | {rollout_2.cell()} | "
        f"{rollout_1.cell()} | {ratio_cell(rollout_2, rollout_1)} | ≥ 1.6× |",
        f"| (c) weight sync, share of an iteration (1 actor × {THREADS} threads; "
        f"{sync_ms.cell('{:,.0f}')} ms) | {share.cell('{:.1%}')} | | | ≤ 5% |",
        f"| (d) PPO iterations/s, asynchronous rollouts (`ppo.async_rollouts=true`, `ppo.max_staleness={STALENESS}`) "
        f"vs synchronous, 1 rollout actor × 1 thread and a 1-thread learner on both sides | "
        f"{async_rate.cell('{:.3f}')} | {sync_rate.cell('{:.3f}')} | {ratio_cell(async_rate, sync_rate)} | ≥ 1.3× |",
        "",
        notes_a,
        "",
        notes_b,
        "",
        notes_c,
        "",
        notes_d,
        "",
        "What each side ran with (read back: ours from each run's resolved config, TRL's from the trainer's args, "
        "its accelerator and `torch.get_num_threads()` during the iterations):",
        "",
        f"- raytrain, 1 × {THREADS}: {notes[f'1x{THREADS}']}",
        f"- raytrain, 2 × 1: {notes['2x1']}",
        f"- raytrain, synchronous: {notes['sync']}",
        f"- raytrain, asynchronous: {notes['async']}",
        f"- TRL: {notes['trl']}",
        "",
        "Tensor memory is not compared for PPO: TRL holds the policy, reference, reward and value models and "
        "the optimizer in one process, while ours spreads them over the learner, the rollout actors and the "
        "reward actor, whose peaks fall at different moments; `debug.track_memory` counts only the learner, so "
        "a sum of per-process peaks would be an upper bound, not a like-for-like figure.",
        "",
        "### Weight sync against model size: streamed vs the object store",
        "",
        "The learner's own sync (`WeightSender`, `raytrain/rlhf/weight_sync.py`), both ways it can go: streamed "
        "(each parameter whole in turn, copied into buckets of `ppo.sync_bucket_mb` = "
        f"{PPOConfig.sync_bucket_mb:g} MiB broadcast over a gloo side group to the rollout actors, which copy them "
        "into their parameters) and through the object store (the whole policy by `ray.put`, each actor fetches "
        "it and copies it into its parameters: `ppo.weight_sync=object_store`), from this "
        f"process into {SYNC_ACTORS} fresh rollout actors × 1 thread each; d_model "
        f"{', '.join(map(str, SYNC_SIZES))} with the demo's 4 layers and vocab 4096; {SYNC_REPEATS} interleaved "
        "repeats after one untimed sync of each. Extra memory is the sender's (`ppo/weight_sync_peak_gib`): the "
        "tensor memory the sync added (a dispatch mode counts it), plus for the object store the copy `ray.put` "
        "makes (a single CPU worker's gathered policy is its parameters; under FSDP it adds as much again).",
        "",
        "| policy | object store, ms | streamed, ms | streamed vs object store (time) | object store extra "
        "memory, MiB | streamed extra memory, MiB |",
        "|---|---:|---:|---:|---:|---:|",
        *sync_rows,
        "",
        sync_table,
        "",
        *(["", "(A `--tiny` smoke run: toy sizes; the figures mean nothing.)"] if TINY else []),
        "",
        "Generation tokens/s against `transformers` `generate` is row (d) of the generation section.",
    ])


def _ms(spread: Spread) -> str:
    return Spread([v * 1000 for v in spread.values]).cell("{:,.1f}")


def _trl_version() -> str:
    import trl

    return trl.__version__
