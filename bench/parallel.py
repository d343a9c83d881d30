"""Parallel layouts on this CPU: tokens/s and memory per worker for dp2, tp2 and pp2 against one worker.

All runs train the demo model on the same data with the same global batch, one after the
other in this run. These are CPU numbers (gloo over loopback, two cores shared by all
workers): they show what each layout costs in communication and memory here, not GPU speed.
Each layout runs twice: once for speed, and once, shorter, counting its live tensors
(debug.track_memory, which slows steps), next to what `raytrain plan` estimates for it.
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
from raytrain.parallel.plan import plan_ranks
from raytrain.stages import STAGES

STEPS = 24
MEMORY_STEPS = 4
LAYOUTS = {
    "1 worker": ["parallel.workers=1", "parallel.cpus_per_worker=2"],
    "dp2 (FSDP2)": ["parallel.workers=2"],
    "tp2, sequence + loss parallel": ["parallel.workers=2", "parallel.tp=2"],
    "tp2, plain": ["parallel.workers=2", "parallel.tp=2", "parallel.sequence_parallel=false",
                   "parallel.loss_parallel=false"],
    "pp2 (1F1B, 2 micro-batches)": ["parallel.workers=2", "parallel.pp=2", "train.micro_batches=2"],
}
MIB = 2**20


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


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
        for i, (name, overrides) in enumerate(LAYOUTS.items()):
            layout = load_config("demo", [*base, f"run.name=speed{i}", *overrides])
            STAGES["pretrain"].run(layout)
            steady = [r for r in records(work / f"speed{i}")[1:] if "train/loss" in r]  # past start-up
            rate = statistics.median(r["perf/tokens_per_s"] for r in steady)
            resident = max(r["mem/peak_gib"] for r in steady)
            STAGES["pretrain"].run(load_config("demo", [*base, f"run.name=memory{i}", *overrides,
                                                        f"train.steps={MEMORY_STEPS}",
                                                        f"train.log_every={MEMORY_STEPS}", "debug.track_memory=true"]))
            tensors = max(r["mem/tensor_peak_gib"] for r in records(work / f"memory{i}") if "train/loss" in r) * 1024
            planned = plan_ranks(layout, layout.parallel.workers, layout.data.prepare.seq_len)[0].total_gib * 1024
            single = single or (rate, tensors)
            rows.append(f"| {name} | {rate:,.0f} | **{rate / single[0]:.2f}×** | {tensors:.1f} | "
                        f"**{tensors / single[1]:.2f}×** | {planned:.1f} ({planned / tensors - 1:+.0%}) | "
                        f"{resident:.2f} |")
        return "\n".join([
            "## Parallel layouts on this CPU (not GPU numbers)",
            "",
            f"The demo model, global batch {config.train.global_batch} × {config.data.prepare.seq_len} tokens, "
            f"fp32, gloo over loopback on the 2 cores every worker shares. tokens/s is the median over the "
            f"log intervals after the first of {STEPS} steps. Tensor memory is the most tensor bytes alive at "
            f"once on rank 0, counted over {MEMORY_STEPS} steps of a second run (`debug.track_memory`), next to "
            "`raytrain plan`'s estimate for that rank; the resident set is rank 0's whole process (Python, "
            "torch and Ray included), from the speed run.",
            "",
            "| layout | tokens/s (global) | vs 1 worker | tensor memory, MiB | vs 1 worker | plan's estimate, MiB "
            "| resident set, GiB |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *rows,
        ])
    finally:
        shutil.rmtree(work, ignore_errors=True)
