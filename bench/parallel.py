"""Parallel layouts on this CPU: tokens/s and memory per worker for dp2, tp2 and pp2 against one worker.

All runs train the demo model on the same data with the same global batch and the same two threads in all
(one worker × 2 threads; two workers × 1 thread each, so no layout oversubscribes the two cores). The speed
runs are `raytrain pretrain` runs (Ray Train), REPEATS times round the layouts (1 worker, dp2, tp2, pp2,
1 worker, dp2, ...). These are CPU numbers (gloo over loopback): they show what each layout costs in
communication and memory here, not GPU speed.

Tensor memory does not vary between repeats or with the launcher, so it is counted once per layout, in the
same training loop without Ray Train (raytrain/train/local.py; debug.track_memory, which slows steps): the
1-worker layout in this process, every 2-worker layout in turn in one pair of gloo processes. That spares a
Ray Train run's start-up per layout (15-20 s each here), which is what lets the speed runs repeat within the
budget.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.common import REPEATS, SPREAD_NOTE, TINY, Spread, interleaved, pick, ratio_cell, settings
from raytrain.config import config_from_dict, load_config
from raytrain.data.prepare import run_prepare_stage
from raytrain.data.sources import stdlib_files
from raytrain.data.tokenizer_stage import run_tokenizer_stage
from raytrain.parallel.plan import plan_ranks
from raytrain.stages import STAGES
from raytrain.train.local import run_local

RAY_CPUS = 4
THREADS = 2  # threads of every layout in all: the machine's cores
STEPS = pick(5, 3)  # per speed run; tokens/s is the median of the steps after the first (Ray Data starting)
LOG_EVERY = 1
MEMORY_STEPS = 2  # the second step holds the optimizer state beside the activations: the peak
CORPUS_FILES = pick(40, 20)  # standard library files: far more rows than the runs read
TWO = ["parallel.workers=2", "parallel.cpus_per_worker=1"]
LAYOUTS = {
    "1 worker": ["parallel.workers=1", f"parallel.cpus_per_worker={THREADS}"],
    "dp2 (FSDP2)": TWO,
    "tp2, sequence + loss parallel": [*TWO, "parallel.tp=2"],
    "tp2, plain": [*TWO, "parallel.tp=2", "parallel.sequence_parallel=false", "parallel.loss_parallel=false"],
    "pp2 (1F1B, 2 micro-batches)": [*TWO, "parallel.pp=2", "train.micro_batches=2"],
}
# Timed layouts; the others have their memory counted only. "tp2, plain" (the ablation of sequence and loss
# parallel) is not timed: three more Ray Train runs would take the section past its four minutes.
TIMED = pick([name for name in LAYOUTS if name != "tp2, plain"], ["1 worker", "dp2 (FSDP2)"])
if TINY:
    LAYOUTS = {name: LAYOUTS[name] for name in TIMED}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def memory_config(config, run_name: str):
    return config.with_values({"run.name": run_name, "train.steps": MEMORY_STEPS, "train.log_every": MEMORY_STEPS,
                               "train.checkpoint_every": MEMORY_STEPS, "debug.track_memory": True})


def memory_rank(rank: int, folder: str, configs: list[dict]) -> None:
    """One of the two gloo processes: each 2-worker layout's memory run in turn (mp.spawn's target)."""
    import torch
    import torch.distributed as dist

    os.environ.update(WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/gloo-init", rank=rank, world_size=2)
    try:
        for config in configs:
            run_local(config_from_dict(config), STAGES["pretrain"])
    finally:
        dist.destroy_process_group()


def count_memory(configs: dict, work: Path) -> dict[str, float]:
    """Each layout's most tensor MiB alive at once on rank 0, over MEMORY_STEPS steps."""
    import torch.multiprocessing as mp

    runs = {name: memory_config(config, f"memory{i}") for i, (name, config) in enumerate(configs.items())}
    for config in runs.values():
        if config.parallel.workers == 1:
            run_local(config, STAGES["pretrain"])
    pairs = [config.to_dict() for config in runs.values() if config.parallel.workers == 2]
    if pairs:
        mp.spawn(memory_rank, args=(str(work), pairs), nprocs=2)
    return {name: max(r["mem/tensor_peak_gib"] for r in records(Path(config.run.location)) if "train/loss" in r)
            * 1024 for name, config in runs.items()}


def run() -> str:
    work = Path(tempfile.mkdtemp(prefix="bench-parallel-"))
    try:
        corpus = work / "corpus"
        corpus.mkdir()
        for i, path in enumerate(stdlib_files()[:CORPUS_FILES]):
            shutil.copy(path, corpus / f"module_{i:03d}.txt")
        base = [f"run.root='{work}'", "runtime.progress=false", f"data.source.inputs=['{corpus}']",
                f"data.tokenizer.out='{work}/tok'", f"data.prepare.tokenizer='{work}/tok'",
                f"data.prepare.out='{work}/data'", f"train.data='{work}/data'", f"train.steps={STEPS}",
                f"train.log_every={LOG_EVERY}", "train.val_every=0", f"train.checkpoint_every={STEPS}",
                # MFU is not reported here: a configured peak spares every run the 1-second matmul it measures.
                "tracking.mode=disabled", "train.peak_tflops=1"]
        config = load_config("demo", base)
        run_tokenizer_stage(config)
        run_prepare_stage(config)
        configs = {name: load_config("demo", [*base, *overrides]) for name, overrides in LAYOUTS.items()}

        tensors = count_memory(configs, work)
        planned = {name: plan_ranks(c, c.parallel.workers, c.data.prepare.seq_len)[0].total_gib * 1024
                   for name, c in configs.items()}

        runs = {name: 0 for name in configs}

        def speed(name: str):
            def measure() -> dict[str, float]:
                run_dir = work / f"speed{list(configs).index(name)}-{runs[name]}"
                runs[name] += 1
                STAGES["pretrain"].run(configs[name].with_values({"run.name": run_dir.name}))
                steady = [r for r in records(run_dir) if "train/loss" in r][1:]  # past the first interval
                return {"tokens/s": statistics.median(r["perf/tokens_per_s"] for r in steady),
                        "resident_gib": max(r["mem/peak_gib"] for r in steady)}
            return measure

        spreads = interleaved({name: speed(name) for name in TIMED})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    single_rate: Spread = spreads["1 worker"]["tokens/s"]
    rows = []
    for name, layout in configs.items():
        parallel = layout.parallel
        threads = f"{parallel.workers} × {int(parallel.cpus_per_worker)}"
        memory = (f"{tensors[name]:.1f} | {tensors[name] / tensors['1 worker']:.2f}× | "
                  f"{planned[name]:.1f} ({planned[name] / tensors[name] - 1:+.0%})")
        if name not in spreads:
            rows.append(f"| {name} | {threads} | not timed | — | {memory} | — |")
            continue
        rate = spreads[name]["tokens/s"]
        versus = "—" if name == "1 worker" else ratio_cell(rate, single_rate)
        rows.append(f"| {name} | {threads} | {rate.cell()} | {versus} | {memory} | "
                    f"{spreads[name]['resident_gib'].cell('{:.2f}')} |")
    return "\n".join([
        "## Parallel layouts on this CPU (not GPU numbers)",
        "",
        f"The demo model, global batch {config.train.global_batch} × {config.data.prepare.seq_len} tokens, fp32, "
        f"gloo over loopback, on {CORPUS_FILES} standard library files. Every layout runs {THREADS} threads in "
        f"all on the 2 cores (workers × threads per worker below, set by `parallel.cpus_per_worker`), so none "
        f"oversubscribes them. tokens/s (global) is each `raytrain pretrain` run's median over its steps after "
        f"the first (which waits for Ray Data's stream to start), of {STEPS}; the runs go round the timed "
        f"layouts {REPEATS} times. Tensor memory is the most tensor bytes alive at once on rank 0 over "
        f"{MEMORY_STEPS} steps, counted once per layout (it is the same in every repeat) by `debug.track_memory` "
        "in the same training loop run without Ray Train (`raytrain/train/local.py`: the 1-worker layout in the "
        "benchmark's process, the 2-worker layouts in turn in one pair of gloo processes), which spares a Ray "
        "Train run's start-up per layout; beside it, `raytrain plan`'s estimate for that rank. The resident set "
        "is rank 0's whole process (Python, torch and Ray included), the peak of each speed run."
        + ("" if set(TIMED) == set(LAYOUTS) else " `tp2, plain` (tp2 without sequence and loss parallel) has its "
           "memory counted but is not timed: its three Ray Train runs would take the section a minute past its "
           "budget of four."),
        "",
        f"- every layout: {settings(model='demo', dtype='fp32', global_batch=config.train.global_batch, seq_len=config.data.prepare.seq_len, threads_in_all=THREADS, steps=STEPS, log_every=LOG_EVERY, peak_tflops='1 (set: no start-up matmul; MFU not reported)')}",  # noqa: E501
        "",
        SPREAD_NOTE,
        "",
        "| layout | workers × threads | tokens/s (global) | vs 1 worker | tensor memory, MiB | vs 1 worker "
        "| plan's estimate, MiB | resident set, GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ])
