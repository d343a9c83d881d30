"""SFT and reward-model training against TRL: speed over interleaved repeats, and tensor memory, in one run.

The same model (the demo config, randomly initialised: speed does not depend on the weights), the same examples
(`stdlib-qa` and `stdlib-prefs` rows of 128 tokens, fed to TRL already tokenized), the same batch (16
conversations, or 16 preference pairs = 32 sequences), fp32 on both sides (TRL's configs default to bf16
autocast and SFT's to a chunked loss: both are set explicitly and read back from the trainers), AdamW, 2 torch
threads, no activation checkpointing, padding per batch to the longest example in both. raytrain runs `raytrain
sft` / `raytrain reward` (one Ray Train worker, Ray Data stream); TRL runs its `SFTTrainer` (completion-only
loss) / `RewardTrainer` in this process.

Speed: each repeat is a fresh run of each side in turn: ours under Ray, TRL's, and ours in this process without
Ray (`run_local`, the diagnosis when we fall short). The statistic is the same on every side: the median, over
the steps after warm-up, of one step's wall time from fetching its batch to the end of the optimizer step (ours:
`perf/step_time_s` with `train.log_every=1`, so each record is one step; TRL: the time between consecutive
`on_step_end` callbacks). Memory: the most tensor bytes alive at once over a few
steps of a separate, untimed run (counting slows each op): ours with `debug.track_memory=true` in this process
(`raytrain.train.local.run_local`), TRL's `trainer.train()` under the same `TensorMemory` dispatch mode, the
parameters, gradients and optimizer state tracked at each step's start as our loop tracks them.
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
    REPEATS,
    SPREAD_NOTE,
    THREADS,
    TINY,
    Spread,
    interleaved,
    phase,
    pick,
    ratio_cell,
    settings,
)
from raytrain.config import load_config
from raytrain.data.manifest import PreparedDataset
from raytrain.data.stdlib_qa import STDLIB_PREFS, STDLIB_QA
from raytrain.data.stream import read_rows
from raytrain.model.transformer import Transformer
from raytrain.train.checkpoint import save_model

RAY_CPUS = 4  # logical CPUs of the section's Ray (bench/run.py starts it): the worker's 2 and Ray Data's reads
STEPS = pick(20, 4)  # optimizer steps per timed run
WARMUP = pick(4, 1)  # steps left out of each timed run's median
MEMORY_STEPS = pick(3, 2)  # steps of the untimed memory run (the optimizer state exists from the first)
BATCH = 16
# The untimed memory run's settings (tensor memory counted: every op slower).
MEMORY_RUN = [f"train.steps={MEMORY_STEPS}", f"train.log_every={MEMORY_STEPS}",
              f"train.checkpoint_every={MEMORY_STEPS}", "debug.track_memory=true"]
MODEL = pick([], ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2"])
MIB = 2**20



def our_step_time(run_dir: Path) -> dict[str, float]:
    """Median seconds per step over the steps after warm-up (log_every=1: each record is one step), and the
    median share of a step spent waiting for the batch."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r and r["step"] > WARMUP]
    assert len(steps) == STEPS - WARMUP, f"expected {STEPS - WARMUP} step records, got {len(steps)}"
    return {"step_s": statistics.median(r["perf/step_time_s"] for r in steps),
            "data_wait": statistics.median(r["perf/data_wait_frac"] for r in steps)}


def our_settings(run_dir: Path) -> str:
    """What our worker ran with, read back from the run's resolved config."""
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    train, parallel = resolved["train"], resolved["parallel"]
    return settings(precision=train["precision"], threads=int(parallel["cpus_per_worker"]),
                    activation_checkpointing=parallel["activation_checkpointing"], compile=parallel["compile"],
                    padding="per-batch", loss="fp32-cross-entropy")


def split_rows(dataset: PreparedDataset) -> np.ndarray:
    train = dataset.split("train")
    return read_rows(train, np.arange(train.num_rows), dataset.row_len, dataset.columns)


class TRL:
    """One of TRL's trainers, built afresh for each run on the same weights and examples."""

    def __init__(self, trainer_class, config_class, load_model, dataset, tokenizer, out: Path,
                 padding: str = "per-batch", trainer_options: dict | None = None, **options):
        """padding: what the page says of its rows; trainer_options: the trainer's own (a peft_config);
        options: its config's."""
        self.trainer_class, self.config_class, self.load_model = trainer_class, config_class, load_model
        self.dataset, self.tokenizer, self.out, self.options = dataset, tokenizer, out, options
        self.padding, self.trainer_options = padding, trainer_options or {}
        self.ran_with = ""
        self.tokens_per_row = 0.0  # an SFT trainer's real tokens per row after its own preparation (packing)

    def trainer(self, steps: int, callbacks: list):
        args = self.config_class(
            output_dir=str(self.out), per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=1e-3,
            lr_scheduler_type="constant", weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
            save_strategy="no", report_to=[], logging_steps=steps, use_cpu=True, dataloader_num_workers=0,
            disable_tqdm=True, seed=0,
            # TRL's defaults differ from ours: bf16 autocast (even on CPU) and activation checkpointing.
            bf16=False, fp16=False, gradient_checkpointing=False, **self.options)
        return self.trainer_class(model=self.load_model(), args=args, train_dataset=self.dataset,
                                  processing_class=self.tokenizer, callbacks=callbacks, **self.trainer_options)

    def step_time(self) -> float:
        """Median seconds between consecutive step ends after warm-up; notes what the trainer ran with."""
        from transformers import TrainerCallback

        ends: list[float] = []
        threads: list[int] = []

        class StepTimes(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                ends.append(time.perf_counter())
                threads.append(torch.get_num_threads())

        with phase("post_training", f"TRL {self.trainer_class.__name__} run"):
            trainer = self.trainer(STEPS, [StepTimes()])
            if "input_ids" in trainer.train_dataset.column_names:  # the rows it trains on: examples, or packed
                self.tokens_per_row = float(np.mean([len(ids) for ids in trainer.train_dataset["input_ids"]]))
            trainer.train()
        args = trainer.args
        knobs = {"bf16": args.bf16, "fp16": args.fp16, "autocast": trainer.accelerator.mixed_precision,
                 "dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
                 "threads": max(threads), "gradient_checkpointing": args.gradient_checkpointing}
        if hasattr(args, "loss_type"):
            knobs["loss_type"] = args.loss_type
        if hasattr(args, "padding_free"):
            knobs["padding_free"] = args.padding_free
        if hasattr(args, "packing"):
            knobs["packing"] = args.packing
        self.ran_with = settings(**knobs, padding=self.padding)
        assert len(ends) == STEPS, f"TRL ran {len(ends)} steps, not {STEPS}"
        return statistics.median(np.diff(ends[WARMUP - 1:]))

    def tensor_peak(self) -> float:
        """The most tensor bytes alive at once during MEMORY_STEPS steps, as our loop counts them."""
        from transformers import TrainerCallback

        from raytrain.train.memory import TensorMemory, training_tensors

        memory = TensorMemory()

        class Track(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                memory.track(training_tensors([trainer.model], [trainer.optimizer] if trainer.optimizer else []))

        with phase("post_training", f"TRL {self.trainer_class.__name__} memory run"):
            trainer = self.trainer(MEMORY_STEPS, [Track()])
            with memory:
                trainer.train()
        return memory.peak


def trl_sft_examples(data: Path, pad: int):
    """The SFT rows as TRL takes them (input_ids without padding, the loss mask as completion_mask), and the mean
    real tokens per example."""
    import datasets

    rows = split_rows(PreparedDataset.open(data))
    lengths = (rows[:, 0] != pad).sum(axis=1)
    examples = datasets.Dataset.from_dict({
        "input_ids": [r[0, :n].tolist() for r, n in zip(rows, lengths, strict=True)],
        "completion_mask": [r[1, :n].tolist() for r, n in zip(rows, lengths, strict=True)]})
    return examples, float(lengths.mean())


def our_tensor_peak(stage, config) -> float:
    """Our loop's tensor peak over MEMORY_STEPS steps, in this process (debug.track_memory)."""
    from raytrain.train.local import run_local

    run_local(config, stage)
    records = [json.loads(line) for line in (Path(config.run.location) / "metrics.jsonl").read_text().splitlines()]
    return max(r["mem/tensor_peak_gib"] for r in records if "mem/tensor_peak_gib" in r) * 2**30


def base_overrides(work: Path) -> list[str]:
    """The settings every timed run of ours shares (fine-tuning benchmarks: this section's and bench/finetune.py's)."""
    return [f"run.root='{work}'", "runtime.progress=false", f"data.tokenizer.out='{work}/tok'",
            f"data.prepare.tokenizer='{work}/tok'", *MODEL, f"train.steps={STEPS}", "train.log_every=1",
            "train.val_every=0", "train.val_batches=1", f"train.checkpoint_every={STEPS}",
            "tracking.mode=disabled", f"parallel.cpus_per_worker={THREADS}", f"train.global_batch={BATCH}",
            "train.lr=0.001", "train.warmup_steps=0", "train.precision=fp32",
            "parallel.activation_checkpointing=none", "parallel.compile=false"]


def prepare_inputs(work: Path, base: list[str], section: str, prefs: bool):
    """The demo tokenizer, `stdlib-qa` SFT rows (and `stdlib-prefs` preference rows), a randomly initialised demo
    model as a checkpoint (work/init) and a Hugging Face folder (work/hf), and with prefs a score-head one
    (work/init-rm, work/hf-rm). Returns (the config, the pad id)."""
    from raytrain.data.chat_data import run_prefs_data_stage, run_sft_data_stage
    from raytrain.data.tokenizer import load_tokenizer
    from raytrain.data.tokenizer_stage import run_tokenizer_stage
    from raytrain.export.hf import checkpoint_to_hf

    config = load_config("demo", base)
    with phase(section, "tokenizer"):
        run_tokenizer_stage(load_config("demo", [*base, *CORPUS]))
    with phase(section, "data"):
        run_sft_data_stage(load_config("demo", [*base, f"data.source.inputs=[{STDLIB_QA}]",
                                                f"data.prepare.out='{work}/sft'"]))
        if prefs:
            run_prefs_data_stage(load_config("demo", [*base, f"data.source.inputs=[{STDLIB_PREFS}]",
                                                      f"data.prepare.out='{work}/prefs'"]))
    meta = {"step": 0, "mask_fraction": 0.15, "seed": 0, "tokenizer": {"path": f"{work}/tok"}}
    model = Transformer(config.model)
    model.init_weights(0)
    save_model(work / "init", model, {**meta, "objective": "causal"})
    checkpoint_to_hf(str(work / "init"), str(work / "hf"))
    if prefs:
        scorer = Transformer(config.model, head="score")
        scorer.init_weights(0)
        save_model(work / "init-rm", scorer, {**meta, "objective": "reward",
                                              "reward": {"mean": 0.0, "std": 1.0, "responses": 1}})
        checkpoint_to_hf(str(work / "init-rm"), str(work / "hf-rm"))
    return config, load_tokenizer(work / "tok").special["pad"]


def run() -> str:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    from raytrain.stages import STAGES
    from raytrain.train.local import run_local

    torch.set_num_threads(THREADS)
    work = Path(tempfile.mkdtemp(prefix="bench-post-"))
    runs = itertools.count()
    try:
        base = base_overrides(work)
        config, pad = prepare_inputs(work, base, "post_training", prefs=True)
        tokenizer = AutoTokenizer.from_pretrained(work / "hf")

        def ours(stage: str, data: str, notes: dict, local: bool = False):
            """A timed run of ours: `raytrain STAGE` (Ray Train worker, Ray Data stream), or with local=True the
            same loop in this process (run_local: no Ray Train, batches read in-process), the diagnosis."""
            def measure() -> dict[str, float]:
                name = f"{stage}-{next(runs)}"
                run_config = load_config("demo", [*base, f"run.name={name}", f"train.data='{work}/{data}'",
                                                  f"train.init_from='{work}/init'"])
                with phase("post_training", f"raytrain {stage} {'in-process ' if local else ''}run {name}"):
                    if local:
                        run_local(run_config, STAGES[stage])
                    else:
                        STAGES[stage].run(run_config)
                if not local:
                    notes["settings"] = our_settings(work / name)
                measures = our_step_time(work / name)
                shutil.rmtree(work / name, ignore_errors=True)
                return measures
            return measure

        def our_memory(stage: str, data: str) -> float:
            with phase("post_training", f"raytrain {stage} memory run"):
                return our_tensor_peak(STAGES[stage], load_config("demo", [
                    *base, *MEMORY_RUN, f"run.name={stage}-memory", f"train.data='{work}/{data}'",
                    f"train.init_from='{work}/init'"]))

        # SFT: TRL gets the same rows (input_ids without padding, the loss mask as completion_mask).
        sft_data, tokens_per_example = trl_sft_examples(work / "sft", pad)
        trl_sft = TRL(SFTTrainer, SFTConfig,
                      lambda: LlamaForCausalLM.from_pretrained(work / "hf", dtype=torch.float32,
                                                               attn_implementation="sdpa"),
                      sft_data, tokenizer, work / "trl-sft", completion_only_loss=True, loss_type="nll",
                      max_length=config.data.prepare.seq_len + 1, padding_free=False, packing=False)
        ours_sft: dict = {}
        sft = interleaved({"ours": ours("sft", "sft", ours_sft), "trl": lambda: {"step_s": trl_sft.step_time()},
                           "local": ours("sft", "sft", ours_sft, local=True)})
        sft_memory = {"ours": our_memory("sft", "sft"), "trl": trl_sft.tensor_peak()}

        # Reward model: TRL's on a score-head model of the same architecture.
        pairs = split_rows(PreparedDataset.open(work / "prefs"))
        prefs_data = datasets.Dataset.from_dict({
            "chosen_ids": [r[0][r[0] != pad].tolist() for r in pairs],
            "rejected_ids": [r[1][r[1] != pad].tolist() for r in pairs]})
        trl_rm = TRL(RewardTrainer, RewardConfig,
                     lambda: LlamaForSequenceClassification.from_pretrained(work / "hf-rm", dtype=torch.float32,
                                                                            attn_implementation="sdpa"),
                     prefs_data, tokenizer, work / "trl-rm", max_length=config.data.prepare.seq_len)
        ours_rm: dict = {}
        rm = interleaved({"ours": ours("reward", "prefs", ours_rm), "trl": lambda: {"step_s": trl_rm.step_time()},
                          "local": ours("reward", "prefs", ours_rm, local=True)})
        rm_memory = {"ours": our_memory("reward", "prefs"), "trl": trl_rm.tensor_peak()}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def rate(spreads, per_step: float) -> dict[str, Spread]:
        """Each side's step times as a rate (per_step units per second), repeat by repeat."""
        return {side: Spread([per_step / s for s in spreads[side]["step_s"].values]) for side in spreads}

    sft_rate, rm_rate = rate(sft, BATCH * tokens_per_example), rate(rm, BATCH)

    def memory_row(label: str, peaks: dict) -> str:
        ours_mib, trl_mib = Spread([peaks["ours"] / MIB]), Spread([peaks["trl"] / MIB])
        return (f"| {label} | {ours_mib.cell('{:,.1f}')} | {trl_mib.cell('{:,.1f}')} | "
                f"{ratio_cell(ours_mib, trl_mib, lower_is_better=True)} | — |")

    def speed_rows(label: str, rates: dict[str, Spread], fmt: str) -> list[str]:
        return [
            f"| {label} | {rates['ours'].cell(fmt)} | {rates['trl'].cell(fmt)} | "
            f"{ratio_cell(rates['ours'], rates['trl'])} | ≥ 1.0× |",
            f"| … the same loop in this process, without Ray (`run_local`; diagnosis) | {rates['local'].cell(fmt)} | "
            f"{rates['trl'].cell(fmt)} | {ratio_cell(rates['local'], rates['trl'])} | — |"]

    def verdict(name: str, rates: dict[str, Spread], spreads) -> str:
        """Whether the row meets ≥ 1.0×; where it does not, what the runs measured about the gap."""
        if rates["ours"].median >= rates["trl"].median:
            return f"{name}: goal met."
        local, trl = rates["local"], rates["trl"]
        where = ("so the loop itself is slower than TRL's on this model, with or without Ray"
                 if local.median < trl.median and not local.overlaps(trl) else
                 "so the gap comes with running under Ray (the Ray Train worker, Ray Data's reads on the same 2 "
                 "cores), not from the loop")
        return (f"{name}: short of the goal. Our steps under Ray waited {spreads['ours']['data_wait'].cell('{:.1%}')} "
                "of their time for the batch (`perf/data_wait_frac`); the same loop without Ray ran at "
                f"{ratio_cell(local, trl)} TRL, {where}.")

    return "\n".join([
        "## Fine-tuning and reward model against TRL (CPU)",
        "",
        f"The demo model (d_model {config.model.d_model}, {config.model.n_layers} layers, vocab "
        f"{config.model.vocab_size}), randomly initialised, fp32 on both sides, AdamW (weight decay 0.1, β 0.9/0.95, "
        f"clip 1.0), {THREADS} torch threads, no activation checkpointing, batch {BATCH}, rows of "
        f"{config.data.prepare.seq_len} tokens padded per batch to the longest example in both. raytrain: "
        "`raytrain sft` / `raytrain reward` on one Ray Train worker, batches streamed by Ray Data; TRL "
        f"{_trl_version()}: `SFTTrainer` (completion-only loss, `loss_type=nll`) / `RewardTrainer` on the same "
        "tokenized examples, in this process (`bench/post_training.py`).",
        "",
        f"Speed: {REPEATS} fresh runs of each side, interleaved (ours under Ray, TRL, ours in this process; again "
        f"…), {STEPS} steps each. The statistic is the same on every side: the median over steps "
        f"{WARMUP + 1}–{STEPS} (the first {WARMUP} are warm-up) of one step's wall time, from fetching its batch to "
        "the end of the optimizer step (ours: `perf/step_time_s` logged every step, `train.log_every=1`; TRL: the "
        "time between consecutive `on_step_end` callbacks). SFT tokens/s = conversations/s × the data's mean "
        "real (non-pad) tokens per conversation. Ratios are > 1 where ours is better. " + SPREAD_NOTE,
        "",
        f"Memory: the most tensor bytes alive at once over {MEMORY_STEPS} steps of a separate, untimed run "
        "(counting every op's outputs slows the steps): ours with `debug.track_memory=true` in this process "
        "(`run_local`), TRL's `trainer.train()` under the same `TensorMemory` dispatch mode "
        "(`raytrain/train/memory.py`), with parameters, gradients and optimizer state tracked at each step's "
        "start, as our loop tracks them; the ratio is TRL's bytes ÷ ours. One run per side: the count does not "
        "depend on timing.",
        "",
        "| comparison | raytrain | TRL | ratio | goal |",
        "|---|---:|---:|---:|---:|",
        *speed_rows(f"SFT on `stdlib-qa`, tokens/s ({tokens_per_example:.0f} real tokens per conversation)",
                    sft_rate, "{:,.0f}"),
        memory_row("SFT, tensor memory (MiB)", sft_memory),
        *speed_rows("reward model on `stdlib-prefs`, pairs/s", rm_rate, "{:,.1f}"),
        memory_row("reward model, tensor memory (MiB)", rm_memory),
        "",
        verdict("SFT", sft_rate, sft) + " " + verdict("Reward model", rm_rate, rm),
        "",
        "What each side ran with (read back after the run: ours from the run's resolved config, TRL's from the "
        "trainer's args, its accelerator and `torch.get_num_threads()` during the steps):",
        "",
        f"- SFT, raytrain: {ours_sft['settings']}",
        f"- SFT, TRL: {trl_sft.ran_with}",
        f"- reward model, raytrain: {ours_rm['settings']}",
        f"- reward model, TRL: {trl_rm.ran_with}",
        *(["", "(A `--tiny` smoke run: a toy model and a few steps; the figures mean nothing.)"] if TINY else []),
    ])


def _trl_version() -> str:
    import trl

    return trl.__version__
