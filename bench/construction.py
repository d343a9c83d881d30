"""Building and loading a model on 4 FSDP ranks, side by side in one run: built on the meta device with each rank
allocating and seeding only its shards (ours), against the whole model built and seeded on every rank, then
sharded (what every run did before); and each rank reading only its slices of a Hugging Face folder (`hf:DIR`).

Four gloo processes (no Ray: nothing else in the measure), one thread each, fp32, FSDP over dp_shard=4; a rank's
cost is its peak resident set after building (and loading) minus its resident set before, the largest over the
ranks, and the wall time until every rank is done. Three widths (vocabulary 32768, 4 layers, 16 heads).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.common import SPREAD_NOTE, Spread, curve, interleaved, pick, ratio_cell, settings
from raytrain.config import load_config
from raytrain.model.transformer import Transformer

RAY_CPUS = 0
RANKS = 4
WIDTHS = pick([512, 1024, 2048], [64, 128])
OURS, WHOLE, LOADED = "meta device, own shards (ours)", "whole model on every rank (before)", "ours + hf:DIR load"


def model_overrides(width: int) -> list[str]:
    return [f"model.d_model={width}", "model.n_heads=16", "model.n_kv_heads=16", "model.n_layers=4",
            f"model.vocab_size={pick(32768, 1024)}", f"parallel.workers={RANKS}", f"parallel.dp_shard={RANKS}"]


def build_rank(rank: int, folder: str, side: str, overrides: list[str], hf_dir: str) -> None:
    """One of the gloo processes (mp.spawn's target): build the model one way, write what it cost."""
    import torch.distributed as dist

    from raytrain.parallel.layout import build_layout, parallelize
    from raytrain.parallel.materialize import materialize
    from raytrain.parallel.pipeline import parts_on_meta
    from raytrain.train.checkpoint import load_weights
    from raytrain.train.memory import host_peak_rss_gib, host_rss_gib

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init-{side}", rank=rank, world_size=RANKS)
    try:
        config = load_config("tiny", overrides)
        cpu = torch.device("cpu")
        layout = build_layout(config.parallel, RANKS, cpu)
        dist.barrier()
        before, started = host_rss_gib(), time.perf_counter()
        if side == WHOLE:
            part = Transformer(config.model)
            part.init_weights(0)
            parallelize(part, config.parallel, layout, cpu, bf16=False)
        else:
            ((_, part),) = parts_on_meta(config.model, config.parallel, 0)
            parallelize(part, config.parallel, layout, cpu, bf16=False, fill=lambda p: materialize(p, cpu, 0))
            if side == LOADED:
                load_weights(f"hf:{hf_dir}", part)
        dist.barrier()
        seconds = time.perf_counter() - started
        peak = host_peak_rss_gib()
        torch.save({"gib": peak - before, "seconds": seconds}, f"{folder}/{side}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def measure(side: str, overrides: list[str], hf_dir: Path):
    def run() -> dict[str, float]:
        import torch.multiprocessing as mp

        folder = Path(tempfile.mkdtemp(prefix="bench-build-"))
        try:
            mp.spawn(build_rank, args=(str(folder), side, overrides, str(hf_dir)), nprocs=RANKS)
            ranks = [torch.load(folder / f"{side}-{rank}.pt") for rank in range(RANKS)]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return {"gib": max(r["gib"] for r in ranks), "seconds": max(r["seconds"] for r in ranks)}
    return run


def run() -> str:
    from raytrain.model.hf import save_hf

    work = Path(tempfile.mkdtemp(prefix="bench-construction-"))
    results, sizes = {}, {}
    try:
        for width in WIDTHS:
            overrides = model_overrides(width)
            model = Transformer(load_config("tiny", overrides).model)
            model.init_weights(0)
            sizes[width] = model.num_params()
            save_hf(model, work / f"hf-{width}", shard_bytes=pick(10**9, 10**5))  # a folder of several shards
            del model
            results[width] = interleaved({side: measure(side, overrides, work / f"hf-{width}")
                                          for side in (OURS, WHOLE, LOADED)})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for width in WIDTHS:
        ours, whole, loaded = (results[width][side] for side in (OURS, WHOLE, LOADED))
        fp32 = sizes[width] * 4 / 2**30
        rows.append(f"| {width} | {sizes[width] / 1e6:,.0f} M ({fp32:.2f} GiB) | {ours['gib'].cell('{:.2f}')} | "
                    f"{whole['gib'].cell('{:.2f}')} | {ratio_cell(ours['gib'], whole['gib'], lower_is_better=True)} "
                    f"| {ours['seconds'].cell('{:.1f}')} | {whole['seconds'].cell('{:.1f}')} | "
                    f"{loaded['gib'].cell('{:.2f}')} | {loaded['seconds'].cell('{:.1f}')} |")
    largest: dict[str, Spread] = results[WIDTHS[-1]][OURS]
    loaded_gib = results[WIDTHS[-1]][LOADED]["gib"].median
    knobs = settings(ranks=RANKS, layout="dp_shard=4", dtype="fp32", threads_per_rank=1, layers=4,
                     vocab=pick(32768, 1024))
    return "\n".join([
        "## Building and loading a model (4 FSDP ranks)",
        "",
        __doc__.split("\n\n", 1)[1].strip().replace("\n", " "),
        "",
        SPREAD_NOTE,
        "",
        f"Both sides: {knobs}. Memory: the host memory building took on the rank that took most (GiB); the "
        "whole model's fp32 size is beside each width.",
        "",
        "| d_model | parameters | ours: build GiB | before: build GiB | less memory | ours: build s | before: build s "
        "| ours + load hf:DIR: GiB | s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"At d_model {WIDTHS[-1]} a rank of ours held {largest['gib'].median:.2f} GiB more after building: its "
        f"quarter of the model ({sizes[WIDTHS[-1]] / RANKS * 4 / 2**30:.2f} GiB) and one 16 MiB block of seeded "
        "values; before, every rank held the whole model first. Every rank still draws every value (the seeded "
        "values do not depend on the layout), so the time does not shrink with the ranks. Loading the open model's "
        f"folder added {loaded_gib - largest['gib'].median:.2f} GiB: the pages of the safetensors files the rank "
        "read its slices through (safetensors maps the files; about the rank's quarter of them), file-backed "
        "memory the kernel drops under pressure.",
        "",
        curve("construction-memory", "Host memory to build (and load) per rank, 4 FSDP ranks", "parameters (M)",
              [round(sizes[w] / 1e6) for w in WIDTHS],
              {side: [results[w][side]["gib"].median for w in WIDTHS] for side in (OURS, WHOLE, LOADED)},
              "GiB", fmt="{:.2f}"),
    ])
