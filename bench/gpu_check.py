"""The GPU check: raytrain's own training step and generation on one GPU, runnable where only torch is installed.

    python3 -m bench.gpu_check [--out FILE.json] [--config llama-1b] [key=value ...]

It needs torch, numpy, pyarrow, pyyaml and tokenizers, and neither Ray nor W&B nor a network (the GPU machines
lent to this project have exactly that), and it runs from a copy of the repository as it is. What it measures:

- the training step of raytrain's worker (train/loop.py `Worker.run_step`, which `Worker.run` calls each step):
  the pretrain stage's Worker built as `run_local` builds it (stage preflight, `local_context`, which picks the
  GPU), on a prepared dataset of random tokens it writes first (manifest + Parquet shards, read back by the
  stage's own batch source); the llama-1b preset at vocabulary 32768 in bf16 with torch.compile, one process;
- for each sequence length (512, 2048, 4096; the batch is tokens-per-step / length, so every step holds the same
  tokens: 32,768 where `raytrain plan` fits them in the GPU without checkpointing, as on an H200, else fewer)
  and activation checkpointing off and on: the median step time after warm-up (min and max beside it),
  tokens/s, MFU against the GPU's data-sheet bf16 peak (train/metrics.py) and against a bf16 matmul peak
  measured here, and the allocator's peak (max_memory_allocated, reset per configuration) against
  `raytrain plan`'s estimate for the same configuration;
- generation tokens/s with the KV cache (model/generate.py) for batches of prompts, in fp32 (as raytrain's
  rollout actors and `raytrain generate` hold the weights) and bf16.

Time on an H200, estimated (no GPU has run it yet): ~15 s to start and measure the matmul peak, ~5 s of
generation, then per configuration ~8 s to build the worker (1.04 B parameters made and initialised on the CPU,
as a run does), its compilation in the warm-up steps (a static graph per block shape and checkpointing mode, as a
run with one shape compiles; Dynamo keeps them all in this process and Inductor reuses its compile workers:
~40-60 s for the first, ~20-30 s for each other) and 15 steps of ~0.5 s (~0.65 s with checkpointing, at ~45%
MFU): about 4.5-5 minutes for the 6 configurations. The JSON records each configuration's build, warm-up and
total seconds, to check this.

It writes one JSON (every figure, the settings, the device and the torch version; bench/results/gpu.json by
default, which bench/gpu.py renders into BENCHMARKS.md; rewritten after each part, so that a run killed at a
time limit keeps what it measured) and prints a table. It keeps to a time budget
(--budget-s): a configuration it could not finish in time is recorded as skipped, not run. A configuration
that fails (out of memory, a compile error) is recorded with its error and the others still run; the exit
status is then 1.

On a CPU (tests/test_gpu_bench.py runs it with --config tiny) the same code runs; the allocator's peak is then
the worker's own tensor count (debug.track_memory) and the "data sheet" peak is train/metrics.py's measured
fp32 matmul, as the worker would use.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from raytrain.config import Config, load_config
from raytrain.data.manifest import FORMAT, MANIFEST_FILE
from raytrain.data.packing import TOKEN_DTYPE, rows_per_row_group
from raytrain.data.shards import write_shard
from raytrain.model.generate import generate
from raytrain.model.transformer import Transformer
from raytrain.parallel.plan import plan_ranks
from raytrain.stages.pretrain import STAGE
from raytrain.train.local import local_context
from raytrain.train.loop import Worker
from raytrain.train.metrics import peak_flops, peak_memory_gib, tensor_peak_gib
from raytrain.vocabulary import SPECIAL_TOKENS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "gpu.json"
SCHEMA = "raytrain.gpu_check/1"
# The llama-1b preset as the GPU check trains it: a 32k vocabulary (the preset's 128k is Llama 3's tokenizer),
# bf16 autocast with fp32 master weights, each block compiled, one worker.
DEFAULTS = ["model.vocab_size=32768", "train.precision=bf16", "parallel.compile=true", "parallel.workers=1",
            "parallel.dp_shard=-1", "parallel.tp=1", "parallel.pp=1", "train.micro_batches=1",
            "tracking.mode=disabled"]
# Tokens per step, tried in this order: the first whose plan fits FIT of the GPU's memory (an H200's 139 GiB
# holds 32768 tokens without checkpointing, an H100's 79 GiB 16384).
TOKENS_PER_STEP = [32768, 16384, 8192, 4096]
FIT = 0.85


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"the JSON written (default {RESULTS})")
    parser.add_argument("--config", default="llama-1b", help="preset or YAML file (default llama-1b)")
    parser.add_argument("--seq-lens", type=ints, default=[512, 2048, 4096], metavar="L,L,...")
    parser.add_argument("--tokens-per-step", type=int, default=None,
                        help="global batch × sequence length of every configuration (default: the largest of "
                             f"{', '.join(map(str, TOKENS_PER_STEP))} whose plan, without checkpointing, fits "
                             f"{FIT:.0%} of the GPU's memory; {TOKENS_PER_STEP[0]} on a CPU)")
    parser.add_argument("--ac", default="none,full", help="activation checkpointing modes (default none,full)")
    parser.add_argument("--warmup", type=int, default=5, help="steps before timing (compilation happens here)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--gen-batches", type=ints, default=[1, 16], metavar="B,B,...")
    parser.add_argument("--gen-prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--gen-new", type=int, default=128, help="new tokens per prompt")
    parser.add_argument("--gen-dtypes", default="fp32,bf16")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the square bf16 matmul timed")
    parser.add_argument("--matmul-s", type=float, default=1.0, help="seconds of matmuls for the measured peak")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip configurations that would end past this many seconds (default 420)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, after the defaults")
    args = parser.parse_intermixed_args(argv)  # overrides may come before, between or after options
    args.ac = [mode for mode in args.ac.split(",") if mode]
    args.gen_dtypes = [d for d in args.gen_dtypes.split(",") if d]
    bad = [mode for mode in args.ac if mode not in ("none", "full")]
    if bad or any(d not in ("fp32", "bf16") for d in args.gen_dtypes):
        parser.error("--ac takes none and/or full; --gen-dtypes fp32 and/or bf16")
    steps = [args.tokens_per_step] if args.tokens_per_step else TOKENS_PER_STEP
    if any(seq < 2 or tokens % seq for seq in args.seq_lens for tokens in steps):
        parser.error(f"every --seq-lens value must divide the tokens per step ({', '.join(map(str, steps))})")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# -- peaks --------------------------------------------------------------------------------------------------


def measured_matmul_peak(device: torch.device, size: int, seconds: float) -> dict:
    """bf16 FLOP/s of square matmuls: calibrated on a few, then as many as fill `seconds`, timed to the last."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    out = torch.empty(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    sync(device)
    start = time.perf_counter()
    for _ in range(3):
        torch.matmul(a, b, out=out)
    sync(device)
    runs = max(3, int(seconds / max((time.perf_counter() - start) / 3, 1e-9)))
    start = time.perf_counter()
    for _ in range(runs):
        torch.matmul(a, b, out=out)
    sync(device)
    elapsed = time.perf_counter() - start
    return {"tflops": 2 * size**3 * runs / elapsed / 1e12, "size": size, "runs": runs, "seconds": elapsed,
            "dtype": "bf16"}


# -- data ---------------------------------------------------------------------------------------------------


def write_random_dataset(folder: Path, seq_len: int, rows: int, vocab_size: int, seed: int = 0) -> Path:
    """A prepared pretrain dataset of random tokens (the step's speed does not depend on them), in the layout
    `raytrain data prepare` writes: one Parquet shard of rows of seq_len + 1 tokens, and its manifest. The
    tokenizer entry names no tokenizer: training reads only its size and special ids."""
    row_len = seq_len + 1
    tokens = np.random.default_rng(seed).integers(len(SPECIAL_TOKENS), vocab_size, (rows, row_len),
                                                  dtype=np.int64).astype(TOKEN_DTYPE)
    write_shard(str(folder / "train" / "shard-000000.parquet"), {"tokens": tokens})
    special = {name: index for index, name in enumerate(SPECIAL_TOKENS)}
    split = {"rows_per_row_group": rows_per_row_group(row_len)}
    manifest = {
        "format": FORMAT, "kind": "pretrain", "seq_len": seq_len, "row_len": row_len,
        "dtype": np.dtype(TOKEN_DTYPE).name, "columns": ["tokens"],
        "tokenizer": {"path": "(none: random tokens from bench/gpu_check.py)", "sha256": "", "vocab_size": vocab_size,
                      "special_tokens": {**special, "stop": [special["eos"]]}},
        "splits": {"train": {**split, "rows": rows, "shards": [{"path": "train/shard-000000.parquet", "rows": rows}]},
                   "val": {**split, "rows": 0, "shards": []}},
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return folder


# -- the training step --------------------------------------------------------------------------------------


def pick_tokens_per_step(base: Config, args: argparse.Namespace, memory_gib: float | None) -> tuple[int, str]:
    """Tokens per step of every configuration, and why: given, or the largest that `raytrain plan` fits."""
    if args.tokens_per_step:
        return args.tokens_per_step, "given (--tokens-per-step)"
    if memory_gib is None:
        return TOKENS_PER_STEP[0], "the default (no GPU memory to fit)"
    least = "none" if "none" in args.ac else "full"
    longest = max(args.seq_lens)
    for tokens in TOKENS_PER_STEP:
        config = base.with_values({"train.global_batch": tokens // longest,
                                   "parallel.activation_checkpointing": least})
        planned = plan_ranks(config, 1, longest)[0].total_gib
        if planned <= FIT * memory_gib:
            return tokens, (f"the largest of {TOKENS_PER_STEP} whose plan (AC {least}: {planned:.1f} GiB) "
                            f"fits {FIT:.0%} of the GPU's {memory_gib:.0f} GiB")
    return TOKENS_PER_STEP[-1], f"the smallest of {TOKENS_PER_STEP}: no plan fits {FIT:.0%} of {memory_gib:.0f} GiB"


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_config(base: Config, data: Path, seq_len: int, batch: int, ac: str, steps: int, peak_tflops: float,
                 device: torch.device, runs: Path) -> tuple[Config, str]:
    """The resolved config of one configuration (the stage's preflight, as a run makes it) and its run folder."""
    overrides = {"train.data": str(data), "train.global_batch": batch, "train.steps": steps,
                 "parallel.activation_checkpointing": ac, "train.peak_tflops": peak_tflops,
                 "run.root": str(runs), "run.name": f"seq{seq_len}-ac-{ac}",
                 # On a CPU no allocator keeps statistics: the worker counts its tensors (what `plan` estimates).
                 "debug.track_memory": device.type == "cpu"}
    resolved = STAGE.preflight(base.with_values(overrides))
    return resolved, resolved.run.location


def run_train(base: Config, args: argparse.Namespace, seq_len: int, ac: str, data: Path, peaks: dict,
              device: torch.device, runs: Path) -> dict:
    batch = args.tokens_per_step // seq_len
    result: dict = {"seq_len": seq_len, "global_batch": batch, "activation_checkpointing": ac}
    config, run_dir = train_config(base, data, seq_len, batch, ac, args.warmup + args.steps,
                                   peaks["datasheet_tflops"], device, runs)
    plan = plan_ranks(config, 1, seq_len)[0]
    result["plan_gib"] = {"total": plan.total_gib, "params": plan.param_gib, "grads": plan.grad_gib,
                          "optimizer": plan.optimizer_gib, "activations": plan.activation_gib}
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        result["baseline_gib"] = torch.cuda.memory_allocated(device) / 2**30
    else:
        result["baseline_gib"] = 0.0
    started = time.perf_counter()
    # What run_local hands the worker: this process, on its GPU if torch sees one (unless parallel.use_gpu=false).
    context = local_context(run_dir, 1, config.parallel.use_gpu)
    worker = batches = None
    try:
        worker = Worker(config, run_dir, STAGE, context)
        result["build_s"] = time.perf_counter() - started
        batches = worker.source.batches(0)
        step_s, data_s, sums = [], [], None
        for _ in range(args.warmup + args.steps):
            tick = time.perf_counter()
            step, rows = next(batches)
            tock = time.perf_counter()
            sums = worker.run_step(step, rows)
            step_s.append(time.perf_counter() - tock)
            data_s.append(tock - tick)
        timed = step_s[args.warmup:]
        tokens = worker.tokens_per_step
        result.update({
            "tokens_per_step": tokens,
            "warmup_s": sum(step_s[:args.warmup]),
            "step_s": spread(timed),
            "data_s": spread(data_s[args.warmup:]),
            "tokens_per_s": {"median": tokens / statistics.median(timed), "min": tokens / max(timed),
                             "max": tokens / min(timed)},
            "flops_per_token": worker.flops_per_token,
            "loss": float(sums[0] / sums[1]),
        })
        rate = result["tokens_per_s"]["median"]
        result["mfu_datasheet"] = rate * worker.flops_per_token / (peaks["datasheet_tflops"] * 1e12)
        result["mfu_measured_matmul"] = rate * worker.flops_per_token / (peaks["measured_bf16"]["tflops"] * 1e12)
        measured = tensor_peak_gib(device, worker.memory)["mem/tensor_peak_gib"]
        result["allocator_peak_gib"] = measured
        result["reserved_peak_gib"] = peak_memory_gib(device) if device.type == "cuda" else None
        # What this configuration's own tensors took: the peak less what was left allocated before it.
        result["plan_vs_measured"] = plan.total_gib / max(measured - result["baseline_gib"], 1e-9) - 1
        result["status"] = "ok"
    finally:
        worker = batches = None  # the batch stream holds the worker too
        free(device)
    return result


# -- generation ---------------------------------------------------------------------------------------------


def run_generate(base: Config, args: argparse.Namespace, device: torch.device) -> list[dict]:
    results = []
    with torch.device(device):  # made on the device; its default initialisation (the speed ignores the weights)
        model = Transformer(base.model).eval()
    rng = np.random.default_rng(0)
    try:
        for dtype_name in args.gen_dtypes:
            model.to(torch.bfloat16 if dtype_name == "bf16" else torch.float32)
            for batch in args.gen_batches:
                prompts = rng.integers(len(SPECIAL_TOKENS), base.model.vocab_size, (batch, args.gen_prompt)).tolist()
                generate(model, prompts, min(4, args.gen_new))  # warm-up: kernels, cuBLAS handles
                sync(device)
                start = time.perf_counter()
                out = generate(model, prompts, args.gen_new)  # no stop ids: every row makes gen_new tokens
                sync(device)
                seconds = time.perf_counter() - start
                new = sum(len(row) for row in out)
                results.append({"dtype": dtype_name, "batch": batch, "prompt_tokens": args.gen_prompt,
                                "new_tokens": args.gen_new, "seconds": seconds, "tokens_per_s": new / seconds,
                                "ms_per_step": 1000 * seconds / args.gen_new, "status": "ok"})
    finally:
        model = None
        free(device)
    return results


# -- tables (printed here, rendered as Markdown by bench/gpu.py) -------------------------------------------


TRAIN_HEADERS = ["seq len", "batch", "AC", "step s (min–max)", "tokens/s (min–max)", "MFU data sheet",
                 "MFU measured bf16", "alloc peak GiB", "plan GiB", "plan vs alloc", "warm-up s"]
GENERATE_HEADERS = ["weights", "batch", "prompt", "new tokens", "s", "tokens/s", "ms/step"]


def train_rows(results: dict) -> list[list[str]]:
    rows = []
    for r in results["train"]:
        head = [str(r["seq_len"]), str(r["global_batch"]), r["activation_checkpointing"]]
        if r.get("status") != "ok":
            rows.append(head + [r.get("status", "?")] + [""] * (len(TRAIN_HEADERS) - 4))
            continue
        step, rate = r["step_s"], r["tokens_per_s"]
        rows.append(head + [
            f"{step['median']:.3g} ({step['min']:.3g}–{step['max']:.3g})",
            f"{rate['median']:,.0f} ({rate['min']:,.0f}–{rate['max']:,.0f})",
            f"{r['mfu_datasheet']:.1%}", f"{r['mfu_measured_matmul']:.1%}",
            f"{r['allocator_peak_gib']:.3g}", f"{r['plan_gib']['total']:.3g}", f"{r['plan_vs_measured']:+.0%}",
            f"{r['warmup_s']:.0f}" if r["warmup_s"] >= 10 else f"{r['warmup_s']:.2g}",
        ])
    return rows


def generate_rows(results: dict) -> list[list[str]]:
    rows = []
    for g in results["generate"]:
        head = [g.get("dtype", "?"), str(g.get("batch", "?"))]
        if g.get("status") != "ok":
            rows.append(head + [g.get("status", "?")] + [""] * (len(GENERATE_HEADERS) - 3))
            continue
        rows.append(head + [str(g["prompt_tokens"]), str(g["new_tokens"]), f"{g['seconds']:.3g}",
                            f"{g['tokens_per_s']:,.0f}", f"{g['ms_per_step']:.3g}"])
    return rows


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def summary(results: dict) -> str:
    device, s, peaks = results["device"], results["settings"], results["peaks"]
    return "\n".join([
        f"{device['name']} ({device['type']}), torch {device['torch']}; {s['config']}: {s['params'] / 1e9:.3g} B "
        f"parameters, vocab {s['vocab_size']}, {s['precision']}, compile {s['compile']}; {s['tokens_per_step']:,} "
        f"tokens per step, {s['warmup']} warm-up + {s['steps']} timed steps per configuration",
        f"peaks: {peaks['datasheet_tflops']:.4g} TFLOP/s ({peaks['datasheet_source']}); "
        f"{peaks['measured_bf16']['tflops']:.4g} TFLOP/s measured ({peaks['measured_bf16']['size']}² bf16 matmuls "
        f"for {peaks['measured_bf16']['seconds']:.2g} s)",
        "",
        text_table(TRAIN_HEADERS, train_rows(results)),
        "",
        text_table(GENERATE_HEADERS, generate_rows(results)),
        "",
        f"total {results['total_s']:.0f} s",
    ])


# -- main ---------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # One static graph per shape, as a run (whose shape never changes) compiles it: no dynamic-shape graph
    # after the second length, and room for every length × checkpointing mode in Dynamo's cache.
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(args.seq_lens) + 8)
    overrides = list(args.overrides)
    base = load_config(args.config, [*DEFAULTS, *overrides])
    longest = max(args.seq_lens)
    if max(longest, args.gen_prompt + args.gen_new) > base.model.max_seq_len:
        base = base.with_values({"model.max_seq_len": max(longest, args.gen_prompt + args.gen_new)})
    device = local_context(str(Path(tempfile.gettempdir()) / "raytrain-gpu-check"), 1, base.parallel.use_gpu).device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    else:
        name, memory_gib = platform.processor() or platform.machine(), None
    with torch.device("meta"):
        params = Transformer(base.model).num_params()
    sheet, source = peak_flops(device, base.train.peak_tflops)
    args.tokens_per_step, tokens_reason = pick_tokens_per_step(base, args, memory_gib)
    results: dict = {
        "schema": SCHEMA,
        "command": " ".join(["python3 -m bench.gpu_check", *argv]),
        # timezone.utc, not 3.11's datetime.UTC: the GPU machine's python3 may be older than raytrain asks for
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
        "device": {"type": device.type, "name": name, "memory_gib": memory_gib, "torch": torch.__version__,
                   "cuda": torch.version.cuda, "python": platform.python_version(), "cpus": os.cpu_count()},
        "settings": {
            "config": args.config, "defaults": DEFAULTS, "overrides": overrides, "params": params,
            "vocab_size": base.model.vocab_size, "d_model": base.model.d_model, "n_layers": base.model.n_layers,
            "max_seq_len": base.model.max_seq_len, "precision": base.train.precision,
            "compile": base.parallel.compile, "seq_lens": args.seq_lens, "tokens_per_step": args.tokens_per_step,
            "tokens_per_step_reason": tokens_reason,
            "activation_checkpointing": args.ac, "warmup": args.warmup, "steps": args.steps,
            "gen_batches": args.gen_batches, "gen_prompt": args.gen_prompt, "gen_new": args.gen_new,
            "gen_dtypes": args.gen_dtypes, "budget_s": args.budget_s,
            "mfu_flops": "model FLOPs per token from the worker (model/flops.py); recomputation under "
                         "activation checkpointing is not counted",
        },
        "peaks": {"datasheet_tflops": sheet / 1e12, "datasheet_source": source},
        "train": [], "generate": [], "errors": [],
    }
    print(f"bench.gpu_check on {name} ({device.type}), torch {torch.__version__}", flush=True)

    def save() -> None:
        """The JSON as it stands: written after each part, so that a run killed at its time limit keeps them."""
        results["total_s"] = time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    results["peaks"]["measured_bf16"] = measured_matmul_peak(device, args.matmul_size, args.matmul_s)
    peaks = results["peaks"]
    print(f"peak: {peaks['datasheet_tflops']:.4g} TFLOP/s ({source}); measured bf16 matmul "
          f"{peaks['measured_bf16']['tflops']:.4g} TFLOP/s", flush=True)

    try:
        results["generate"] = run_generate(base, args, device)
    except Exception as error:  # recorded; the training sweep still runs
        results["errors"].append(f"generate: {error!r}")
        results["generate"] = [{"status": f"error: {error!r}"}]
        traceback.print_exc()
    for g in results["generate"]:
        if g.get("status") == "ok":
            print(f"generate {g['dtype']} batch {g['batch']}: {g['tokens_per_s']:,.0f} tokens/s", flush=True)
    save()

    with tempfile.TemporaryDirectory(prefix="raytrain-gpu-check-") as tmp:
        datasets = {seq: write_random_dataset(Path(tmp) / f"data-{seq}", seq, 2 * (args.tokens_per_step // seq),
                                              base.model.vocab_size)
                    for seq in args.seq_lens}
        longest_s = 0.0
        for ac in args.ac:
            for seq in args.seq_lens:
                elapsed = time.perf_counter() - started
                if elapsed + longest_s > args.budget_s:
                    results["train"].append({"seq_len": seq, "global_batch": args.tokens_per_step // seq,
                                             "activation_checkpointing": ac,
                                             "status": f"skipped: {elapsed:.0f} s spent of the {args.budget_s:.0f} "
                                                       f"s budget, the slowest configuration took "
                                                       f"{longest_s:.0f} s"})
                    continue
                tick = time.perf_counter()
                try:
                    result = run_train(base, args, seq, ac, datasets[seq], peaks, device, Path(tmp) / "runs")
                except Exception as error:  # recorded; the other configurations still run
                    traceback.print_exc()
                    results["errors"].append(f"seq {seq} ac {ac}: {error!r}")
                    result = {"seq_len": seq, "global_batch": args.tokens_per_step // seq,
                              "activation_checkpointing": ac, "status": f"error: {type(error).__name__}"}
                result["seconds"] = time.perf_counter() - tick
                longest_s = max(longest_s, result["seconds"])
                results["train"].append(result)
                save()
                if result["status"] == "ok":
                    print(f"seq {seq} × {result['global_batch']}, AC {ac}: {result['tokens_per_s']['median']:,.0f} "
                          f"tokens/s, MFU {result['mfu_datasheet']:.1%} (data sheet) / "
                          f"{result['mfu_measured_matmul']:.1%} (measured), {result['allocator_peak_gib']:.3g} GiB "
                          f"peak vs plan {result['plan_gib']['total']:.3g} GiB, {result['seconds']:.0f} s",
                          flush=True)

    save()
    print()
    print(summary(results))
    print(f"wrote {args.out}")
    if results["errors"]:
        print("errors:\n  " + "\n  ".join(results["errors"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
