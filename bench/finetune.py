"""Packing and LoRA in SFT: packed vs padded rows, LoRA vs full fine-tuning, each against TRL, in one run.

The same model, examples and batch as bench/post_training.py (the demo model randomly initialised, `stdlib-qa` rows
of 128 tokens, 16 conversations a step, fp32, AdamW, 2 torch threads, no activation checkpointing). Every side of
ours runs the one loop in this process (`run_local`: no Ray Train, batches read in-process), so a ratio between two
of ours is the change alone; TRL's trainers run in this process too.

Sides, interleaved over the repeats: ours padded per batch, ours packed (`train.packing=true`), TRL's SFTTrainer
with its own packing (`packing=True`: best-fit decreasing into padding-free rows with position ids), ours with LoRA
(rank 16, alpha 32, every projection; padded per batch), TRL's SFTTrainer with a peft LoRA of the same rank,
alpha and targets (padded per batch), and ours with QLoRA (the same LoRA on an int8 base). Speed is real tokens per
second: conversations per second × the data's mean real tokens per conversation, the same examples on every side.
Memory (one untimed run per side): the most tensor bytes alive over a few steps (`debug.track_memory`) and the
optimizer's state after a step, full vs LoRA; the adapted weights' bytes, LoRA vs QLoRA; QLoRA's quality cost as the
train loss of its last steps against LoRA's.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import REPEATS, SPREAD_NOTE, THREADS, TINY, Spread, interleaved, phase, ratio_cell
from bench.post_training import (
    BATCH,
    MEMORY_RUN,
    STEPS,
    TRL,
    WARMUP,
    base_overrides,
    our_step_time,
    our_tensor_peak,
    prepare_inputs,
    split_rows,
    trl_sft_examples,
)
from raytrain.config import load_config

RAY_CPUS = 4  # logical CPUs of the section's Ray (bench/run.py starts it): the data preparation's
LORA = ["train.lora.rank=16", "train.lora.alpha=32"]
QLORA = [*LORA, "train.lora.quantize=int8"]
LAST = 4  # the train loss compared between LoRA and QLoRA: the mean of the last LAST steps
MIB = 2**20


def optimizer_state_bytes(config, lora: list[str]) -> int:
    """The bytes of AdamW's state after one step of the model as our loop builds it (train/optim.py), with or
    without LoRA's adapters."""
    from raytrain.model.lora import apply_lora
    from raytrain.model.transformer import Transformer
    from raytrain.train.optim import build_optimizer

    config = load_config("demo", [*config, *lora])
    model = Transformer(config.model)
    model.init_weights(0)
    apply_lora(model, config.train.lora)
    optimizer = build_optimizer(model, config.train)
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    optimizer.step()
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t))


def adapted_weight_bytes(config) -> tuple[int, int]:
    """The bytes of the adapted layers' frozen weights as LoRA holds them (fp32) and as QLoRA does (int8 and a
    scale a row): quantize_base's own count on the model our loop builds."""
    from raytrain.model.lora import apply_lora, quantize_base
    from raytrain.model.transformer import Transformer

    config = load_config("demo", [*config, *QLORA])
    model = Transformer(config.model)
    model.init_weights(0)
    apply_lora(model, config.train.lora)
    return quantize_base(model, config.train.lora)


def final_loss(run_dir: Path) -> float:
    """The mean train loss of a run's last LAST steps (the same batches on every side)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return float(np.mean([r["train/loss"] for r in records if "train/loss" in r][-LAST:]))


def positions_per_step(data: Path) -> dict[str, float]:
    """Positions a step of 16 conversations computes, padded per batch vs packed, averaged over the train split
    in batches of 16 (file order): what packing can gain at most."""
    from raytrain.data.manifest import PreparedDataset
    from raytrain.train.objectives import Objective

    rows = torch.from_numpy(split_rows(PreparedDataset.open(data))).long()
    common = {"seed": 0, "global_batch": BATCH, "mask_fraction": 0.0, "mask_id": 0, "trim_multiple": 1}
    padded, packed = Objective("sft", **common), Objective("sft", packing=True, **common)
    batches = [rows[i : i + BATCH] for i in range(0, len(rows) - BATCH + 1, BATCH)]
    return {"padded": float(np.mean([padded(b, 0, 0)[0].numel() for b in batches])),
            "packed": float(np.mean([packed(b, 0, 0)[0].tokens.numel() for b in batches]))}


def run() -> str:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from peft import LoraConfig
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from raytrain.config import LORA_TARGETS
    from raytrain.stages import STAGES
    from raytrain.train.local import run_local

    torch.set_num_threads(THREADS)
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    runs = itertools.count()
    try:
        base = base_overrides(work)
        config, pad = prepare_inputs(work, base, "finetune", prefs=False)
        tokenizer = AutoTokenizer.from_pretrained(work / "hf")
        examples, tokens_per_example = trl_sft_examples(work / "sft", pad)
        positions = positions_per_step(work / "sft")

        def ours(*overrides: str):
            def measure() -> dict[str, float]:
                name = f"sft-{next(runs)}"
                with phase("finetune", f"raytrain sft {' '.join(overrides)} run {name}"):
                    run_local(load_config("demo", [*base, f"run.name={name}", f"train.data='{work}/sft'",
                                                   f"train.init_from='{work}/init'", *overrides]), STAGES["sft"])
                measures = {**our_step_time(work / name), "loss": final_loss(work / name)}
                shutil.rmtree(work / name, ignore_errors=True)
                return measures
            return measure

        def trl(name: str, padding: str, trainer_options=None, **options) -> TRL:
            return TRL(SFTTrainer, SFTConfig,
                       lambda: LlamaForCausalLM.from_pretrained(work / "hf", dtype=torch.float32,
                                                                attn_implementation="sdpa"),
                       examples, tokenizer, work / name, padding=padding, trainer_options=trainer_options,
                       completion_only_loss=True, loss_type="nll", max_length=config.data.prepare.seq_len + 1,
                       **options)

        trl_packed = trl("trl-packed", "packed (best-fit decreasing, padding-free)", packing=True)
        peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                          task_type="CAUSAL_LM")
        trl_lora = trl("trl-lora", "per-batch", {"peft_config": peft}, padding_free=False, packing=False)
        sides = interleaved({
            "padded": ours(), "packed": ours("train.packing=true"),
            "trl_packed": lambda: {"step_s": trl_packed.step_time()},
            "lora": ours(*LORA), "trl_lora": lambda: {"step_s": trl_lora.step_time()}, "qlora": ours(*QLORA)})
        peaks = {}
        for side, extra in (("full", []), ("lora", LORA), ("qlora", QLORA)):
            with phase("finetune", f"raytrain sft memory run ({side})"):
                peaks[side] = our_tensor_peak(STAGES["sft"], load_config("demo", [
                    *base, *MEMORY_RUN, f"run.name=memory-{side}", f"train.data='{work}/sft'",
                    f"train.init_from='{work}/init'", *extra]))
        states = {"full": optimizer_state_bytes(base, []), "lora": optimizer_state_bytes(base, LORA)}
        fp32_weights, int8_weights = adapted_weight_bytes(base)
        settings = {"packed": trl_packed.ran_with, "lora": trl_lora.ran_with}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # Real tokens a step trains on: 16 conversations on our sides and TRL + peft's; 16 of TRL's packed rows, each
    # holding several conversations, on TRL packed's.
    per_step = {side: BATCH * tokens_per_example for side in sides}
    per_step["trl_packed"] = BATCH * trl_packed.tokens_per_row
    rate = {side: Spread([per_step[side] / s for s in spreads["step_s"].values]) for side, spreads in sides.items()}
    step_ms = {side: Spread([1000 * s for s in spreads["step_s"].values]) for side, spreads in sides.items()}
    full_peak, lora_peak, qlora_peak = (Spread([peaks[side] / MIB]) for side in ("full", "lora", "qlora"))
    fp32_mib, int8_mib = Spread([fp32_weights / MIB]), Spread([int8_weights / MIB])
    lora_loss, qlora_loss = sides["lora"]["loss"], sides["qlora"]["loss"]
    full_state, lora_state = Spread([states["full"] / MIB]), Spread([states["lora"] / MIB])
    fmt = "{:,.0f}"
    return "\n".join([
        "## Packing and LoRA in SFT (CPU)",
        "",
        f"The demo model (d_model {config.model.d_model}, {config.model.n_layers} layers, vocab "
        f"{config.model.vocab_size}), randomly initialised, fp32, AdamW, {THREADS} torch threads, no activation "
        f"checkpointing, batch {BATCH} conversations of `stdlib-qa` ({tokens_per_example:.0f} real tokens each on "
        f"average, rows of {config.data.prepare.seq_len}). Every side runs in this process: ours the one loop "
        "without Ray (`run_local`), TRL's `SFTTrainer` (completion-only loss, `loss_type=nll`). Speed: the median "
        f"over steps {WARMUP + 1}–{STEPS} of one step's wall time, as real tokens/s (conversations/s × real tokens "
        f"per conversation, the same examples on every side); {REPEATS} fresh runs per side, interleaved. "
        + SPREAD_NOTE,
        "",
        "| comparison | ours | baseline | ratio | goal |",
        "|---|---:|---:|---:|---:|",
        f"| SFT real tokens/s: packed (`train.packing=true`) vs padded per batch | {rate['packed'].cell(fmt)} | "
        f"{rate['padded'].cell(fmt)} | {ratio_cell(rate['packed'], rate['padded'])} | ≥ 1.8× |",
        f"| SFT real tokens/s: ours packed vs TRL packed | {rate['packed'].cell(fmt)} | "
        f"{rate['trl_packed'].cell(fmt)} | {ratio_cell(rate['packed'], rate['trl_packed'])} | ≥ 1.0× |",
        f"| SFT step time (ms): LoRA r16 vs full fine-tuning (padded) | {step_ms['lora'].cell(fmt)} | "
        f"{step_ms['padded'].cell(fmt)} | {ratio_cell(step_ms['lora'], step_ms['padded'], lower_is_better=True)} | "
        "— |",
        f"| SFT real tokens/s: ours LoRA vs TRL + peft LoRA (padded) | {rate['lora'].cell(fmt)} | "
        f"{rate['trl_lora'].cell(fmt)} | {ratio_cell(rate['lora'], rate['trl_lora'])} | ≥ 1.0× |",
        f"| SFT optimizer state (MiB): LoRA r16 vs full | {lora_state.cell('{:,.2f}')} | "
        f"{full_state.cell('{:,.2f}')} | {ratio_cell(lora_state, full_state, lower_is_better=True)} | — |",
        f"| SFT tensor peak (MiB): LoRA r16 vs full | {lora_peak.cell('{:,.1f}')} | {full_peak.cell('{:,.1f}')} | "
        f"{ratio_cell(lora_peak, full_peak, lower_is_better=True)} | — |",
        f"| SFT step time (ms): QLoRA int8 vs LoRA r16 (padded) | {step_ms['qlora'].cell(fmt)} | "
        f"{step_ms['lora'].cell(fmt)} | {ratio_cell(step_ms['qlora'], step_ms['lora'], lower_is_better=True)} | "
        "— |",
        f"| SFT adapted layers' frozen weights (MiB): QLoRA int8 vs LoRA fp32 | {int8_mib.cell('{:,.2f}')} | "
        f"{fp32_mib.cell('{:,.2f}')} | {ratio_cell(int8_mib, fp32_mib, lower_is_better=True)} | — |",
        f"| SFT tensor peak (MiB): QLoRA int8 vs LoRA r16 | {qlora_peak.cell('{:,.1f}')} | "
        f"{lora_peak.cell('{:,.1f}')} | {ratio_cell(qlora_peak, lora_peak, lower_is_better=True)} | — |",
        f"| SFT train loss, mean of the last {LAST} steps (quality cost): QLoRA int8 vs LoRA r16 | "
        f"{qlora_loss.cell('{:.4f}')} | {lora_loss.cell('{:.4f}')} | "
        f"{ratio_cell(qlora_loss, lora_loss, lower_is_better=True)} | — |",
        "",
        f"What packing can gain here: padded per batch, a step computes {positions['padded']:,.0f} positions on "
        f"average over the train split; packed, {positions['packed']:,.0f} "
        f"({positions['padded'] / positions['packed']:.2f}× fewer), since padding per batch already cuts each batch "
        f"after its longest conversation: even with no fill at all ({BATCH * tokens_per_example:,.0f} positions) "
        f"packing could compute at most {positions['padded'] / (BATCH * tokens_per_example):.2f}× fewer than padding "
        f"per batch here ({BATCH * config.data.prepare.seq_len / (BATCH * tokens_per_example):.1f}× fewer than whole "
        "rows). TRL packed trains on 16 packed rows a step "
        f"({BATCH * trl_packed.tokens_per_row:,.0f} real tokens, not {BATCH} conversations): its tokens/s counts "
        "those.",
        "",
        "Ours packed: each micro-batch's examples laid end to end in rows of at most the row length, attention "
        "restricted to each example by a block-diagonal causal mask (SDPA with a boolean mask) and position ids "
        "restarting per example: the padded run's loss within 1e-5 at every step (tests/test_sft.py). TRL packed "
        f"here runs transformers' `sdpa` attention: {settings['packed']}; TRL + peft: {settings['lora']}. Ours: "
        "`precision=fp32 threads=2 activation_checkpointing=none compile=False loss=fp32-cross-entropy`.",
        "",
        "QLoRA (`train.lora.quantize=int8`): the adapted layers' frozen weights in int8 with one scale a row, "
        "dequantized a layer at a time in the forward and again in the backward (docs/training.md). Its loss row is "
        "the quality cost on this benchmark's model, which is randomly initialised (a trained model's weights "
        "quantize differently): the same batches, seed and settings as the LoRA side; tests/test_lora.py checks "
        "on the pre-trained tiny model that QLoRA's held-out loss stays within 0.02 of LoRA's. Embeddings and "
        "the output layer stay fp32 on both sides, so the tensor peak moves by the adapted weights only.",
        *(["", "(A `--tiny` smoke run: a toy model and a few steps; the figures mean nothing.)"] if TINY else []),
    ])
