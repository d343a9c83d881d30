"""Training speed, each side measured against its baseline in one run, with the same settings on both sides.

(a) our model's training step vs transformers' LlamaForCausalLM (same config, weights, batch, AdamW, fp32, threads),
    tokens/s and tensor memory, as curves over model size and sequence length;
(b) `raytrain pretrain` with one Ray Train worker vs the same loop in one process without Ray (train/local.py);
(c) the MFU of (b): one peak measured once, the same log intervals for tokens/s and MFU, and the ISA's peak.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from bench.common import REPEATS, SPREAD_NOTE, THREADS, TINY, curve, interleaved, pick, ratio_cell, settings
from bench.steps import WARMUP, ops_per_step, step_rate, tensor_peak_mib
from raytrain.config import load_config
from raytrain.data.sources import stdlib_files
from raytrain.model.flops import matmul_params, train_flops_per_token
from raytrain.model.hf import save_hf
from raytrain.model.transformer import Transformer
from raytrain.train.metrics import measure_peak_flops

RAY_CPUS = 4  # one worker of parallel.cpus_per_worker=2 beside Ray Data's readers
STEPS = pick(12, 4)  # per timed side: WARMUP left out, the median of the rest
RUN_STEPS, LOG_EVERY = pick(30, 4), pick(5, 2)  # (b): per run, and the log interval (the first is left out)
TOKENS = pick(2048, 64)  # per step in every curve point: batch × seq_len
D_MODELS = pick([96, 192, 384], [32, 64, 96])  # head_dim 32 (the demo's), kv heads a third of the heads
SEQ_LENS = pick([128, 256, 512], [8, 16, 32])
BASE_D, BASE_SEQ = D_MODELS[1], SEQ_LENS[0]  # the demo's shape: the point both curves share


def model_config(config, d_model: int):
    heads = max(1, d_model // 32)
    return config.with_values({"model.d_model": d_model, "model.n_heads": heads,
                               "model.n_kv_heads": max(1, heads // 3), "model.max_seq_len": max(SEQ_LENS)})


def hf_llama(model: Transformer, folder: Path):
    from transformers import LlamaForCausalLM

    save_hf(model, folder)
    return LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa")


def compare_step(config, seq_len: int, work: Path, compiled: bool = False) -> tuple[dict, dict, int]:
    """side (ours, hf[, compiled]) → measure (tokens/s, model tokens/s) → Spread; tensor memory (MiB) of each
    side; the parameter count — for one model shape."""
    model = Transformer(config.model)
    model.init_weights(0)
    hf = hf_llama(model, work / f"hf-{config.model.d_model}-{seq_len}")
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.model.vocab_size, (TOKENS // seq_len, seq_len + 1), generator=generator)
               for _ in range(STEPS)]
    ours, theirs = (lambda m, x: m(x)), (lambda m, x: m(input_ids=x).logits)
    sides = {"ours": lambda: step_rate(model, batches, ours, config),
             "hf": lambda: step_rate(hf, batches, theirs, config)}
    if compiled:
        fast = Transformer(config.model)
        fast.init_weights(0)
        for block in fast.layers.values():  # what parallel.compile=true does
            block.compile()
        sides["compiled"] = lambda: step_rate(fast, batches, ours, config)
    for measure in sides.values():  # one untimed pass each: the first side to run must not pay the process's warm-up
        measure()
    rates = interleaved(sides)
    memory = {"ours": tensor_peak_mib(model, batches, ours, config), "hf": tensor_peak_mib(hf, batches, theirs, config),
              "ours ops": ops_per_step(model, batches, ours, config),
              "hf ops": ops_per_step(hf, batches, theirs, config)}
    return rates, memory, model.num_params()


def isa_peak() -> tuple[float, str]:
    """FP32 FLOP/s the instruction set allows: cores × clock × FLOP per cycle (FMA = 2 FLOP per lane)."""
    import os

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    field = {line.split(":")[0].strip(): line.split(":", 1)[1].strip() for line in info.splitlines() if ":" in line}
    ghz = float(field.get("cpu MHz", "nan")) / 1000
    flags = set(field.get("flags", "").split())
    if "avx512f" in flags and field.get("vendor_id") == "AuthenticAMD" and field.get("cpu family") == "25":
        per_cycle, why = 32, "AVX-512 on Zen 4: two 256-bit FMA pipes, a 512-bit FMA takes both"
    elif "avx512f" in flags:
        per_cycle, why = 64, "AVX-512: 16 fp32 lanes × 2 (FMA) × 2 FMA units"
    elif "fma" in flags:
        per_cycle, why = 32, "AVX2: 8 fp32 lanes × 2 (FMA) × 2 FMA units"
    else:
        per_cycle, why = 8, "SSE: 4 fp32 lanes × 2 (add + multiply)"
    cores = os.cpu_count() or 1
    return cores * ghz * 1e9 * per_cycle, f"{cores} cores × {ghz:.2f} GHz × {per_cycle} FLOP/cycle ({why})"


def prepared_data(work: Path):
    """The tokenizer and packed rows (b) streams, from the stdlib corpus (a few modules in a tiny run)."""
    from raytrain.data.prepare import run_prepare_stage
    from raytrain.data.tokenizer_stage import run_tokenizer_stage

    inputs = ["stdlib"]
    if TINY:
        corpus = work / "corpus"
        corpus.mkdir()
        for i, path in enumerate(stdlib_files()[:8]):
            shutil.copy(path, corpus / f"module_{i}.txt")
        inputs = [str(corpus)]
    config = load_config("demo", [f"run.root='{work}'", "runtime.progress=false", f"data.source.inputs={inputs}",
                                  f"data.tokenizer.out='{work}/tok'", f"data.prepare.tokenizer='{work}/tok'",
                                  f"data.prepare.out='{work}/data'", f"train.data='{work}/data'",
                                  f"train.steps={RUN_STEPS}", f"train.log_every={LOG_EVERY}", "train.val_every=0",
                                  f"train.checkpoint_every={RUN_STEPS}", "tracking.mode=disabled",
                                  f"parallel.cpus_per_worker={THREADS}", "train.precision=fp32",
                                  f"data.prepare.seq_len={BASE_SEQ}"])
    run_tokenizer_stage(config)
    run_prepare_stage(config)
    return config


def steady(run_dir: Path) -> dict[str, float]:
    """Tokens/s and MFU as medians over the same log intervals: all after the first (start-up and warm-up)."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    intervals = [r for r in records if "train/loss" in r][1:] or [r for r in records if "train/loss" in r]
    return {"tokens/s": statistics.median(r["perf/tokens_per_s"] for r in intervals),
            "mfu": statistics.median(r["perf/mfu"] for r in intervals),
            "data wait": statistics.median(r["perf/data_wait_frac"] for r in intervals)}


def ray_against_plain(config, work: Path) -> tuple[dict, float]:
    """(b): side → measure → Spread, and the one peak (FLOP/s) both sides' MFU is computed against."""
    from raytrain.stages import STAGES
    from raytrain.train.local import run_local

    peak = measure_peak_flops(torch.device("cpu"))  # this driver, THREADS threads: what a worker gets
    config = config.with_values({"train.peak_tflops": peak / 1e12})
    runs = iter(range(2 * REPEATS))

    def on_ray() -> dict:
        name = f"ray-{next(runs)}"
        STAGES["pretrain"].run(config.with_values({"run.name": name}))
        return steady(work / name)

    def plain() -> dict:
        name = f"plain-{next(runs)}"
        run_local(config.with_values({"run.name": name}), STAGES["pretrain"])
        return steady(work / name)

    return interleaved({"ray": on_ray, "plain": plain}), peak


def step_note(step: dict, memory: dict, mfu: float) -> str:
    """Why (a) stands where it does, from what was measured."""
    if step["ours"].median / step["hf"].median >= 1.2 and not step["ours"].overlaps(step["hf"]):
        return "(a) goal met."
    return (f"(a) short of the goal, measured: the two models run the same computation (tensor memory "
            f"{memory['ours']:.1f} against {memory['hf']:.1f} MiB; a step dispatches {memory['ours ops']:,} aten "
            f"operations in ours, {memory['hf ops']:,} in `transformers`, clipping and AdamW included) and this step "
            f"already runs at about {mfu:.0%} of the measured matmul peak ((c)), so the kernels both call, "
            "not the Python around them, set its time; fusing kernels ((a'), `parallel.compile=true`) is where a "
            "gain can come from on this machine.")


def run() -> str:
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        config = prepared_data(work)
        points = {}
        for d_model in D_MODELS:
            points[d_model, BASE_SEQ] = compare_step(model_config(config, d_model), BASE_SEQ, work,
                                                     compiled=d_model == BASE_D)
        for seq_len in SEQ_LENS[1:]:
            points[BASE_D, seq_len] = compare_step(model_config(config, BASE_D), seq_len, work)
        measured, peak = ray_against_plain(config, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rates, memory, params = points[BASE_D, BASE_SEQ]
    step = {side: measures["tokens/s"] for side, measures in rates.items()}
    alone = {side: measures["model tokens/s"] for side, measures in rates.items()}
    flops = train_flops_per_token(config.model, BASE_SEQ)
    ray, plain = measured["ray"], measured["plain"]
    implied = ray["tokens/s"].median * flops / peak
    mfu = ray["mfu"].median
    assert abs(implied / mfu - 1) < 0.02, f"MFU {mfu:.3%} is not tokens/s × FLOPs ÷ peak = {implied:.3%}"
    isa, isa_how = isa_peak()
    both = settings(dtype="fp32", threads=THREADS, optimizer="AdamW", clip=1.0,
                    batch=f"{TOKENS // BASE_SEQ}x{BASE_SEQ}", attention="sdpa", steps=f"{STEPS}-{WARMUP}")

    def curve_of(name: str, title: str, key, xs: list[int], x_label: str) -> str:
        chosen = [points[key(x)] for x in xs]
        return curve(name, title, x_label, xs, {"raytrain": [p[0]["ours"]["tokens/s"].median for p in chosen],
                                                "transformers": [p[0]["hf"]["tokens/s"].median for p in chosen]},
                     "tokens/s",
                     right={"raytrain": [p[1]["ours"] for p in chosen], "transformers": [p[1]["hf"] for p in chosen]},
                     right_label="tensor MiB")

    return "\n".join([
        "## Training step (CPU)",
        "",
        f"The demo model ({params / 1e6:.1f} M parameters: d_model {BASE_D}, {config.model.n_layers} layers, "
        f"vocab {config.model.vocab_size}), random tokens, {TOKENS // BASE_SEQ} × {BASE_SEQ} tokens per step. "
        f"Both sides of (a): {both}; each repeat times {STEPS} steps and takes the median step after {WARMUP}. "
        "Tensor memory: the most tensor bytes alive at once over two steps (weights, gradients, AdamW state, "
        "activations), counted by the dispatch mode behind `debug.track_memory`, in a separate untimed run (it "
        "does not vary between repeats). " + SPREAD_NOTE,
        "",
        "| comparison | raytrain | baseline | ratio | goal |",
        "|---|---:|---:|---:|---:|",
        f"| (a) training step, tokens/s: our model vs `transformers` LlamaForCausalLM | {step['ours'].cell()} | "
        f"{step['hf'].cell()} | {ratio_cell(step['ours'], step['hf'])} | ≥ 1.2× |",
        f"| (a) the same steps' forward + loss + backward alone (the models' own share; clipping and AdamW are the "
        f"same code on both sides), tokens/s | {alone['ours'].cell()} | {alone['hf'].cell()} | "
        f"{ratio_cell(alone['ours'], alone['hf'])} | — |",
        f"| (a) tensor memory of that step, MiB | {memory['ours']:,.1f} | {memory['hf']:,.1f} | "
        f"{memory['ours'] / memory['hf']:.2f}× the baseline's | — |",
        f"| (a') our blocks compiled (`parallel.compile=true`) vs `transformers` eager, tokens/s | "
        f"{step['compiled'].cell()} | {step['hf'].cell()} | {ratio_cell(step['compiled'], step['hf'])} "
        "| ≥ 1.2× |",
        f"| (b) `raytrain pretrain` (1 Ray Train worker, Ray Data stream) vs the same loop in one process "
        f"without Ray (`train/local.py`), tokens/s | {ray['tokens/s'].cell()} | {plain['tokens/s'].cell()} | "
        f"{ratio_cell(ray['tokens/s'], plain['tokens/s'])} | ≥ 0.9× |",
        "",
        step_note(step, memory, ray["mfu"].median),
        "",
        f"(b) runs the `stdlib` corpus packed at {BASE_SEQ} tokens, {RUN_STEPS} steps, one log interval per "
        f"{LOG_EVERY} steps; both sides: {settings(dtype='fp32', threads=THREADS, batch=config.train.global_batch)}; "
        "the statistic on both sides is the median over the log intervals after the first of the interval's "
        "tokens/s (the same `metrics.jsonl` field). The share of step time spent waiting for the next batch "
        f"(`perf/data_wait_frac`): {ray['data wait'].cell('{:.1%}')} on Ray Data, "
        f"{plain['data wait'].cell('{:.1%}')} reading in-process.",
        "",
        f"(c) MFU of the `raytrain pretrain` runs: **{mfu:.1%}** (min–max {ray['mfu'].low:.1%}–{ray['mfu'].high:.1%})"
        f", the median over the same intervals as (b)'s tokens/s: {ray['tokens/s'].median:,.0f} tokens/s × "
        f"{flops / 1e6:.2f} MFLOP per token ÷ {peak / 1e9:.1f} GFLOP/s = {implied:.1%}. The peak is one fp32 "
        f"matmul measurement ({THREADS} threads, 1024² matrices, 1 s) taken before the runs and handed to both "
        f"(`train.peak_tflops`), so the runs' own `perf/mfu` uses it too. The instruction set's peak is "
        f"{isa / 1e9:.0f} GFLOP/s ({isa_how}, at the clock the kernel reports: a core that boosts above it "
        f"can pass 100%); the measured matmul reaches {peak / isa:.0%} of it, and the run "
        f"{ray['tokens/s'].median * flops / isa:.1%}. FLOPs per token: 6·N over the "
        f"{matmul_params(config.model) / 1e6:.2f} M matmul "
        "weights plus causal attention counted as computed, 6·L·d·T (half of the 12·L·d·T a full score matrix "
        "would take: the fused kernel skips the masked half; `raytrain/model/flops.py`).",
        "",
        "### How the step's cost grows with the model and the context",
        "",
        f"Both sides as in (a), {TOKENS} tokens per step at every point (batch = {TOKENS} / seq_len), medians of "
        f"{REPEATS} interleaved repeats; memory on the right axis.",
        "",
        curve_of("train-vs-model-size", f"Training step vs model size (seq_len {BASE_SEQ})", lambda d: (d, BASE_SEQ),
                 D_MODELS, "d_model"),
        "",
        curve_of("train-vs-seq-len", f"Training step vs sequence length (d_model {BASE_D})", lambda s: (BASE_D, s),
                 SEQ_LENS, "seq_len"),
    ])
