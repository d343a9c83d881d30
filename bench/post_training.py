"""SFT and reward-model training speed against TRL, side by side in one run.

The same model (the demo config, randomly initialised: speed does not depend on the weights), the same
examples (`stdlib-qa` and `stdlib-prefs` rows of 128 tokens, fed to TRL already tokenized), the same batch
(16 conversations, or 16 preference pairs = 32 sequences), fp32, AdamW, 2 threads, padding per batch in both.
raytrain runs `raytrain sft` / `raytrain reward` (one Ray Train worker, Ray Data stream); TRL runs its
`SFTTrainer` (completion-only loss) / `RewardTrainer` in this process. Rates are medians of the step times after
warm-up; SFT tokens/s = conversations/s × the data's mean real (non-pad) tokens per conversation.
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
from raytrain.data.manifest import PreparedDataset
from raytrain.data.stdlib_qa import STDLIB_PREFS, STDLIB_QA
from raytrain.data.stream import read_rows
from raytrain.model.transformer import Transformer
from raytrain.train.checkpoint import save_model

THREADS = 2
STEPS = 40
WARMUP = 10  # steps (TRL) and log intervals' worth of steps (ours) left out as warm-up
BATCH = 16
PAD = 2


def our_step_time(run_dir: Path) -> float:
    """Median seconds per step over the log intervals after the first (start-up and warm-up)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["perf/step_time_s"] for r in records if "train/loss" in r and r["step"] > WARMUP)


def trl_step_time(trainer_class, config_class, model, dataset, tokenizer, out: Path, **options) -> float:
    """Median seconds between consecutive step ends after warm-up, for one TRL trainer."""
    from transformers import TrainerCallback

    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    args = config_class(output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=1e-3,
                        lr_scheduler_type="constant", save_strategy="no", report_to=[], logging_steps=STEPS,
                        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
                        gradient_checkpointing=False, **options)  # TRL's default is on; ours recomputes nothing
    trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                  callbacks=[StepTimes()]).train()
    return statistics.median(np.diff(ends[WARMUP - 1:]))


def split_rows(dataset: PreparedDataset) -> np.ndarray:
    train = dataset.split("train")
    return read_rows(train, np.arange(train.num_rows), dataset.row_len, dataset.columns)


def run() -> str:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    from raytrain.data.chat_data import run_prefs_data_stage, run_sft_data_stage
    from raytrain.data.tokenizer_stage import run_tokenizer_stage
    from raytrain.export.hf import checkpoint_to_hf
    from raytrain.stages import STAGES

    torch.set_num_threads(THREADS)
    work = Path(tempfile.mkdtemp(prefix="bench-post-"))
    try:
        base = [f"run.root='{work}'", "runtime.progress=false", f"data.tokenizer.out='{work}/tok'",
                f"data.prepare.tokenizer='{work}/tok'", f"train.steps={STEPS}", "train.log_every=5",
                "train.val_every=0", "train.val_batches=1", f"train.checkpoint_every={STEPS}",
                "tracking.mode=disabled", f"parallel.cpus_per_worker={THREADS}", f"train.global_batch={BATCH}",
                "train.lr=0.001", "train.warmup_steps=0"]
        config = load_config("demo", base)
        run_tokenizer_stage(config)
        run_sft_data_stage(load_config("demo", [*base, f"data.source.inputs=[{STDLIB_QA}]",
                                                f"data.prepare.out='{work}/sft'"]))
        run_prefs_data_stage(load_config("demo", [*base, f"data.source.inputs=[{STDLIB_PREFS}]",
                                                  f"data.prepare.out='{work}/prefs'"]))
        model = Transformer(config.model)
        model.init_weights(0)
        meta = {"step": 0, "objective": "causal", "mask_fraction": 0.15, "seed": 0,
                "tokenizer": {"path": f"{work}/tok"}}
        save_model(work / "init", model, meta)
        checkpoint_to_hf(str(work / "init"), str(work / "hf"))
        tokenizer = AutoTokenizer.from_pretrained(work / "hf")

        # SFT: ours, then TRL on the same rows (input_ids without padding, the loss mask as completion_mask).
        STAGES["sft"].run(load_config("demo", [*base, "run.name=sft", f"train.data='{work}/sft'",
                                     f"train.init_from='{work}/init'"]))
        ours_sft = our_step_time(work / "sft")
        rows = split_rows(PreparedDataset.open(work / "sft"))
        lengths = (rows[:, 0] != PAD).sum(axis=1)
        sft_data = datasets.Dataset.from_dict({
            "input_ids": [r[0, :n].tolist() for r, n in zip(rows, lengths, strict=True)],
            "completion_mask": [r[1, :n].tolist() for r, n in zip(rows, lengths, strict=True)]})
        hf_lm = LlamaForCausalLM.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="sdpa")
        trl_sft = trl_step_time(SFTTrainer, SFTConfig, hf_lm, sft_data, tokenizer, work / "trl-sft",
                                completion_only_loss=True, max_length=config.data.prepare.seq_len + 1,
                                padding_free=False)
        tokens_per_example = float(lengths.mean())

        # Reward model: ours from the same initial weights, then TRL's on its HF export.
        STAGES["reward"].run(load_config("demo", [*base, "run.name=rm", f"train.data='{work}/prefs'",
                                        f"train.init_from='{work}/init'"]))
        ours_rm = our_step_time(work / "rm")
        checkpoint_to_hf(str(work / "rm"), str(work / "hf-rm"))
        pairs = split_rows(PreparedDataset.open(work / "prefs"))
        prefs_data = datasets.Dataset.from_dict({
            "chosen_ids": [r[0][r[0] != PAD].tolist() for r in pairs],
            "rejected_ids": [r[1][r[1] != PAD].tolist() for r in pairs]})
        hf_rm = LlamaForSequenceClassification.from_pretrained(work / "hf-rm", dtype=torch.float32,
                                                               attn_implementation="sdpa")
        trl_rm = trl_step_time(RewardTrainer, RewardConfig, hf_rm, prefs_data, tokenizer, work / "trl-rm",
                               max_length=config.data.prepare.seq_len)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    sft_ours, sft_trl = BATCH * tokens_per_example / ours_sft, BATCH * tokens_per_example / trl_sft
    rm_ours, rm_trl = BATCH / ours_rm, BATCH / trl_rm
    return "\n".join([
        "## Fine-tuning and reward model against TRL (CPU)",
        "",
        f"The demo model (d_model {config.model.d_model}, {config.model.n_layers} layers, vocab "
        f"{config.model.vocab_size}), fp32, AdamW, {THREADS} threads, batch {BATCH}, rows of "
        f"{config.data.prepare.seq_len} tokens padded per batch in both; {STEPS} steps, medians after {WARMUP}. "
        f"raytrain: `raytrain sft` / `raytrain reward` on one Ray Train worker; TRL {_trl_version()}: "
        "`SFTTrainer` (completion-only loss) / `RewardTrainer` on the same tokenized examples and weights "
        "(`bench/post_training.py`).",
        "",
        "| comparison | raytrain | TRL | ratio | goal |",
        "|---|---:|---:|---:|---:|",
        f"| SFT on `stdlib-qa`, tokens/s ({tokens_per_example:.0f} real tokens per conversation) | {sft_ours:,.0f} | "
        f"{sft_trl:,.0f} | **{sft_ours / sft_trl:.2f}×** | ≥ 1.0× |",
        f"| reward model on `stdlib-prefs`, pairs/s | {rm_ours:,.1f} | {rm_trl:,.1f} | **{rm_ours / rm_trl:.2f}×** | "
        "≥ 1.0× |",
    ])


def _trl_version() -> str:
    import trl

    return trl.__version__
