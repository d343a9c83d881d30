"""Parallel layouts on this CPU: tokens/s and peak memory per worker for dp2, tp2 and pp2 against one worker.

All four runs train the demo model on the same data with the same global batch, one after
the other in this run. These are CPU numbers (gloo over loopback, two cores shared by all
workers): they show what each layout costs in communication and memory here, not GPU speed.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from pathlib import Path

from raytrain.config import load_config
from raytrain.data.prepare import run_prepare_stage
from raytrain.data.tokenizer_stage import run_tokenizer_stage
from raytrain.train.launch import run_pretrain

STEPS = 24
LAYOUTS = {
    "1 worker": ["parallel.workers=1", "parallel.cpus_per_worker=2"],
    "dp2 (FSDP2)": ["parallel.workers=2"],
    "tp2": ["parallel.workers=2", "parallel.tp=2"],
    "pp2 (1F1B, 2 micro-batches)": ["parallel.workers=2", "parallel.pp=2", "train.micro_batches=2"],
}


def run() -> str:
    work = Path(tempfile.mkdtemp(prefix="bench-parallel-"))
    try:
        base = [f"run.root='{work}'", "runtime.progress=false", f"data.tokenizer.out='{work}/tok'",
                f"data.prepare.tokenizer='{work}/tok'", f"data.prepare.out='{work}/data'",
                f"train.data='{work}/data'", f"train.steps={STEPS}", f"train.log_every={STEPS // 4}",
                "train.val_every=0", f"train.checkpoint_every={STEPS}", "tracking.mode=disabled"]
        config = load_config("demo", base)
        run_tokenizer_stage(config)
        run_prepare_stage(config)
        rows = []
        single = None
        for name, overrides in LAYOUTS.items():
            run_name = name.split()[0]
            run_pretrain(load_config("demo", [*base, f"run.name={run_name}", *overrides]))
            records = [json.loads(x) for x in (work / run_name / "metrics.jsonl").read_text().splitlines()]
            steady = [r for r in records[1:] if "train/loss" in r]  # past start-up
            rate = statistics.median(r["perf/tokens_per_s"] for r in steady)
            memory = max(r["mem/peak_gib"] for r in records if "mem/peak_gib" in r)
            single = single or (rate, memory)
            rows.append(f"| {name} | {rate:,.0f} | **{rate / single[0]:.2f}×** | {memory:.2f} | "
                        f"{memory / single[1]:.2f}× |")
        return "\n".join([
            "## Parallel layouts on this CPU (not GPU numbers)",
            "",
            f"The demo model, global batch {config.train.global_batch} × {config.model.max_seq_len} tokens, "
            f"{STEPS} steps per layout, fp32, gloo over loopback on the 2 cores every worker shares. "
            "tokens/s is the median over the log intervals after the first; memory is the worker's "
            "peak resident set (its whole process: Python, torch and Ray included), the largest over "
            "the run as rank 0 reports it.",
            "",
            "| layout | tokens/s (global) | vs 1 worker | peak memory per worker, GiB | vs 1 worker |",
            "|---|---:|---:|---:|---:|",
            *rows,
        ])
    finally:
        shutil.rmtree(work, ignore_errors=True)
