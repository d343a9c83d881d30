"""`raytrain demo`: the training chain on the stdlib corpus, on one machine, in minutes."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import shutil

from raytrain.config import Config
from raytrain.data.manifest import PreparedDataset
from raytrain.data.prepare import run_prepare_stage
from raytrain.data.tokenizer_stage import run_tokenizer_stage
from raytrain.evaluate import unigram_baseline
from raytrain.model_commands import generate
from raytrain.train.launch import run_pretrain

log = logging.getLogger("raytrain")
STAGES = 3


def run_demo(config: Config) -> None:
    base = config.run.dir
    tokenizer_dir, data_dir, train_run = base / "tokenizer", base / "data", base / "pretrain"
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
    summary = run_pretrain(config)

    before, after = summary["val_first"], summary["val_last"]
    unigram = unigram_baseline(PreparedDataset.open(data_dir))
    print(f"\nval loss {before['val/loss']:.3f} (ppl {before['val/ppl']:.0f}) before training → "
          f"{after['val/loss']:.3f} (ppl {after['val/ppl']:.1f}) after {summary['steps']} steps; "
          f"unigram baseline {unigram:.3f} (ppl {math.exp(unigram):.0f})")
    print(f"{summary['tokens_seen']:,.0f} tokens at {summary['tokens_per_s']:,.0f} tokens/s, "
          f"MFU {summary['final']['perf/mfu']:.1%}, wall {summary['wall_s']:.0f}s")
    generate(argparse.Namespace(checkpoint=str(train_run), prompt=["def ", "import "], tokenizer=None,
                                max_new_tokens=48, temperature=0.7, top_k=40, top_p=0.95, seed=0))
    print(f"\ndemo outputs in {base}/")
    print(f"  tokenizer  {tokenizer_dir}/tokenizer.json")
    print(f"  dataset    {data_dir}/manifest.json  (train/ and val/ Parquet shards)")
    print(f"  run        {train_run}/  (metrics.jsonl, summary.json, checkpoints/, wandb/)")
    print(f"  next       raytrain generate --checkpoint {train_run} --prompt 'class '")
