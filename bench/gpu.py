"""BENCHMARKS.md's GPU section: renders what the GPU check measured (bench/results/gpu.json, committed after a run of
`python3 -m bench.gpu_check` on a GPU machine), or says that it has not been measured yet. Nothing runs here: the
check itself needs a GPU and neither Ray nor a network (bench/gpu_check.py).

RAYTRAIN_GPU_RESULTS names another results file (the test renders a tiny CPU run's).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RAY_CPUS = 0
ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("RAYTRAIN_GPU_RESULTS", ROOT / "bench" / "results" / "gpu.json"))
COMMAND = "python3 -m bench.gpu_check --out bench/results/gpu.json"
HEADING = "## GPU: the worker's training step and generation on one GPU (bench/gpu_check.py)"
GOAL_MFU = 0.45  # of the data sheet's bf16 peak, for llama-1b's step on an H200


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render(results: dict) -> str:
    """The section from a results JSON of bench/gpu_check.py."""
    from bench.gpu_check import GENERATE_HEADERS, TRAIN_HEADERS, generate_rows, train_rows

    device, s, peaks = results["device"], results["settings"], results["peaks"]
    matmul = peaks["measured_bf16"]
    cuda = f", CUDA {device['cuda']}" if device.get("cuda") else ""
    lines = [
        HEADING,
        "",
        f"Measured on **{device['name']}** ({device['type']}, torch {device['torch']}{cuda}, Python "
        f"{device['python']}) at {results['measured_at']} by `{results['command']}` in {results['total_s']:.0f} s "
        "(no Ray there: the worker's own step, `Worker.run_step`, built as `run_local` builds it, on a prepared "
        "dataset of random tokens read by the pretrain stage's batch source).",
        "",
        f"Model: `--config {s['config']}` with `{' '.join([*s['defaults'], *s['overrides']])}`: "
        f"{s['params'] / 1e9:.3g} B parameters (d_model {s['d_model']}, {s['n_layers']} layers, vocab "
        f"{s['vocab_size']}, max_seq_len {s['max_seq_len']}), {s['precision']}, compile {s['compile']}, one "
        f"process. Every configuration holds {s['tokens_per_step']:,} tokens per step ({s['tokens_per_step_reason']}"
        f"; batch = that / sequence length); a figure is the median over {s['steps']} timed steps after "
        f"{s['warmup']} warm-up steps (which hold the compilation: *warm-up s*), with min–max.",
        "",
        f"MFU counts {s['mfu_flops']}. Two peaks: the data sheet's {peaks['datasheet_tflops']:.4g} TFLOP/s "
        f"({peaks['datasheet_source']}) and {matmul['tflops']:.4g} TFLOP/s measured on the same device "
        f"({matmul['size']}² {matmul['dtype']} matmuls for {matmul['seconds']:.2g} s). *alloc peak* is the "
        "allocator's peak (`torch.cuda.max_memory_allocated`, reset per configuration; on a CPU the worker's own "
        "tensor count); *plan* is `raytrain plan`'s estimate for the same configuration (`plan_ranks`), and "
        "*plan vs alloc* how far above (+) or below (−) the measured peak it is.",
        "",
        markdown_table(TRAIN_HEADERS, train_rows(results)),
        "",
        goal_line(results),
        "",
        f"Generation with the KV cache (`raytrain.model.generate`, greedy, {s['gen_prompt']}-token random "
        f"prompts, {s['gen_new']} new tokens each, no stop token; fp32 weights are what rollout actors and "
        "`raytrain generate` hold):",
        "",
        markdown_table(GENERATE_HEADERS, generate_rows(results)),
    ]
    if device["type"] != "cuda":
        lines += ["", "*Not a GPU run*: these figures come from a CPU and say nothing about a GPU."]
    if results.get("errors"):
        lines += ["", "Errors: " + "; ".join(f"`{e}`" for e in results["errors"])]
    return "\n".join(lines)


def goal_line(results: dict) -> str:
    done = [r for r in results["train"] if r.get("status") == "ok"]
    if not done:
        return f"Goal: ≥ {GOAL_MFU:.0%} MFU against the data sheet; no configuration finished."
    best = max(done, key=lambda r: r["mfu_datasheet"])
    verdict = "met" if best["mfu_datasheet"] >= GOAL_MFU else "not met"
    return (f"Goal: ≥ {GOAL_MFU:.0%} MFU against the data sheet: best {best['mfu_datasheet']:.1%} (sequence length "
            f"{best['seq_len']}, checkpointing {best['activation_checkpointing']}), {verdict}.")


def run() -> str:
    if RESULTS.exists():
        return render(json.loads(RESULTS.read_text()))
    return "\n".join([
        HEADING,
        "",
        "**Not measured yet**: no session has had a GPU machine to run the check on. On a machine with one CUDA "
        "GPU, from the repository root (torch, numpy, pyarrow, pyyaml and tokenizers are enough: no Ray, no W&B, "
        "no network; about 5 minutes on an H200 by estimate, and it skips any configuration that would end past 7 "
        "minutes, judged by the slowest one so far):",
        "",
        f"    {COMMAND}",
        "",
        "It trains the llama-1b preset (vocab 32768, bf16, torch.compile) with the worker's own step at sequence "
        "lengths 512, 2048 and 4096, activation checkpointing off and on, and reports tokens/s, MFU against the "
        "data-sheet and a measured bf16 matmul peak, the allocator's peak against `raytrain plan`'s estimate, and "
        "generation tokens/s with the KV cache. Commit bench/results/gpu.json and run `python -m bench.run gpu` "
        f"to put its figures here. Goal: ≥ {GOAL_MFU:.0%} MFU against the data sheet on an H200.",
    ])
