"""`raytrain demo`: the training chain on the stdlib corpus, on one machine, in minutes."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import shutil
from pathlib import Path

from raytrain.config import Config
from raytrain.data.chat_data import run_sft_data_stage
from raytrain.data.manifest import PreparedDataset
from raytrain.data.prepare import run_prepare_stage
from raytrain.data.stdlib_qa import STDLIB_QA, is_val_module, stdlib_qa
from raytrain.data.tokenizer_stage import run_tokenizer_stage
from raytrain.evaluate import unigram_baseline
from raytrain.model_commands import generate
from raytrain.train.launch import run_pretrain, run_sft

log = logging.getLogger("raytrain")
STAGES = 5
# Fine-tuning after pre-training: fewer steps, a gentler learning rate (the pre-training config's other keys hold).
SFT_STEPS, SFT_LR, SFT_WARMUP = 200, 1e-3, 10


def run_demo(config: Config) -> None:
    base = config.run.dir
    tokenizer_dir, data_dir, train_run = base / "tokenizer", base / "data", base / "pretrain"
    sft_data_dir, sft_run = base / "sft-data", base / "sft"
    data = config.data
    config = dataclasses.replace(
        config,
        run=dataclasses.replace(config.run, root=str(base), name="pretrain"),
        data=dataclasses.replace(
            data,
            tokenizer=dataclasses.replace(data.tokenizer, out=str(tokenizer_dir), overwrite=True),
            prepare=dataclasses.replace(data.prepare, tokenizer=str(tokenizer_dir), out=str(data_dir),
                                        overwrite=True),
        ),
        train=dataclasses.replace(config.train, data=str(data_dir)),
    )
    log.info("demo [1/%d] tokenizer on %s", STAGES, ", ".join(data.source.inputs))
    run_tokenizer_stage(config)
    log.info("demo [2/%d] token shards", STAGES)
    run_prepare_stage(config)
    log.info("demo [3/%d] pre-training", STAGES)
    shutil.rmtree(train_run, ignore_errors=True)  # the demo starts fresh rather than resuming
    pretrained = run_pretrain(config)
    report_pretraining(pretrained, data_dir, train_run)

    log.info("demo [4/%d] fine-tuning data: %s", STAGES, STDLIB_QA)
    run_sft_data_stage(dataclasses.replace(config, data=dataclasses.replace(
        config.data, source=dataclasses.replace(config.data.source, inputs=[STDLIB_QA]),
        prepare=dataclasses.replace(config.data.prepare, out=str(sft_data_dir)))))
    log.info("demo [5/%d] supervised fine-tuning from the pre-trained model", STAGES)
    shutil.rmtree(sft_run, ignore_errors=True)
    tuned = run_sft(dataclasses.replace(
        config, run=dataclasses.replace(config.run, name="sft"),
        train=dataclasses.replace(config.train, data=str(sft_data_dir), init_from=str(train_run), steps=SFT_STEPS,
                                  lr=SFT_LR, warmup_steps=SFT_WARMUP)))
    report_fine_tuning(tuned, sft_run, config.data.prepare.seed, config.data.prepare.val_fraction)

    print(f"\ndemo outputs in {base}/")
    print(f"  tokenizer  {tokenizer_dir}/tokenizer.json  (with the chat template)")
    print(f"  datasets   {data_dir}/, {sft_data_dir}/  (manifest.json, train/ and val/ Parquet shards)")
    print(f"  runs       {train_run}/, {sft_run}/  (metrics.jsonl, summary.json, checkpoints/, wandb/)")
    print(f"  next       raytrain generate --chat --checkpoint {sft_run} --prompt 'What does `os.path.join` do?'")


def report_pretraining(summary: dict, data_dir: Path, run: Path) -> None:
    before, after = summary["val_first"], summary["val_last"]
    unigram = unigram_baseline(PreparedDataset.open(data_dir))
    print(f"\npre-training: val loss {before['val/loss']:.3f} (ppl {before['val/ppl']:.0f}) → "
          f"{after['val/loss']:.3f} (ppl {after['val/ppl']:.1f}) after {summary['steps']} steps; "
          f"unigram baseline {unigram:.3f} (ppl {math.exp(unigram):.0f})")
    print(f"{summary['tokens_seen']:,.0f} tokens at {summary['tokens_per_s']:,.0f} tokens/s, "
          f"MFU {summary['final']['perf/mfu']:.1%}, wall {summary['wall_s']:.0f}s")
    generate(argparse.Namespace(checkpoint=str(run), prompt=["def ", "import "], tokenizer=None,
                                max_new_tokens=48, temperature=0.7, top_k=40, top_p=0.95, seed=0, chat=False,
                                system=None))


def report_fine_tuning(summary: dict, run: Path, seed: int, val_fraction: float) -> None:
    before, after = summary["val_first"], summary["val_last"]
    print(f"\nfine-tuning: held-out answer loss {before['val/loss']:.3f} (ppl {before['val/ppl']:.0f}) before → "
          f"{after['val/loss']:.3f} (ppl {after['val/ppl']:.1f}) after {summary['steps']} steps "
          f"(questions on modules never trained on), wall {summary['wall_s']:.0f}s")
    held_out = next(p for p in stdlib_qa() if p.kind == "what_does" and is_val_module(p.module, seed, val_fraction))
    print(f"a held-out question; reference answer: {held_out.answer}")
    generate(argparse.Namespace(checkpoint=str(run), prompt=[held_out.question], tokenizer=None, max_new_tokens=48,
                                temperature=0.0, top_k=0, top_p=1.0, seed=0, chat=True, system=None))
