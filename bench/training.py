"""Training and generation speed, each measured side by side with its baseline in one run.

(a) our model's training step vs transformers' LlamaForCausalLM (same config, batch, AdamW);
(b) `raytrain pretrain` with one worker vs the same loop in one process without Ray (train/local.py);
(c) the MFU of (b) against the measured matmul peak of this CPU;
(d) generation with our KV cache vs transformers' `generate` on the same weights.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.steps import WARMUP, step_rate
from raytrain.config import load_config
from raytrain.data.manifest import PreparedDataset
from raytrain.data.stream import BatchOrder, read_rows
from raytrain.model.flops import train_flops_per_token
from raytrain.model.generate import generate
from raytrain.model.hf import save_hf
from raytrain.model.transformer import Transformer
from raytrain.train.metrics import measure_peak_flops

THREADS = 2
STEPS = 40


def hf_llama(model: Transformer, folder: Path):
    from transformers import LlamaForCausalLM

    save_hf(model, folder)
    return LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa")


def run() -> str:
    from raytrain.data.prepare import run_prepare_stage
    from raytrain.data.tokenizer_stage import run_tokenizer_stage
    from raytrain.stages import STAGES
    from raytrain.train.local import run_local

    torch.set_num_threads(THREADS)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        config = load_config("demo", [f"run.root='{work}'", "run.name=bench", "runtime.progress=false",
                                      f"data.tokenizer.out='{work}/tok'", f"data.prepare.tokenizer='{work}/tok'",
                                      f"data.prepare.out='{work}/data'", f"train.data='{work}/data'",
                                      f"train.steps={STEPS}", f"train.log_every={STEPS // 4}", "train.val_every=0",
                                      f"train.checkpoint_every={STEPS}", "tracking.mode=disabled",
                                      f"parallel.cpus_per_worker={THREADS}"])
        run_tokenizer_stage(config)
        run_prepare_stage(config)
        dataset = PreparedDataset.open(config.train.data)
        order = BatchOrder(dataset.split("train").num_rows, config.train.global_batch, config.train.seed)
        batches = [torch.from_numpy(read_rows(dataset.split("train"), order.consumer_rows(s), dataset.row_len)).long()
                   for s in range(STEPS)]

        model = Transformer(config.model)
        model.init_weights(0)
        hf = hf_llama(model, work / "hf")
        compiled = Transformer(config.model)
        compiled.init_weights(0)
        for block in compiled.layers.values():  # what parallel.compile=true does
            block.compile()
        rates: dict[str, list[float]] = {"ours": [], "hf": [], "compiled": []}
        for _ in range(2):  # alternated, so drift on the machine hits all alike
            rates["ours"].append(step_rate(model, batches, lambda m, x: m(x), config))
            rates["hf"].append(step_rate(hf, batches, lambda m, x: m(input_ids=x).logits, config))
            rates["compiled"].append(step_rate(compiled, batches, lambda m, x: m(x), config))
        ours_rate, hf_rate, compiled_rate = (statistics.median(rates[k]) for k in ("ours", "hf", "compiled"))

        # (b) the one loop on a Ray Train worker (Ray Data stream) vs the same loop in this process without Ray
        # (train/local.py: batches read in-process), back to back, the same config.
        def steady_rate(run: str) -> float:
            """The median tokens/s of the log intervals after the first (which holds start-up and warm-up)."""
            records = [json.loads(x) for x in (work / run / "metrics.jsonl").read_text().splitlines()]
            return statistics.median(r["perf/tokens_per_s"] for r in records[1:] if "train/loss" in r)

        run_local(config.with_values({"run.name": "plain"}), STAGES["pretrain"])
        plain_rate = steady_rate("plain")
        summary = STAGES["pretrain"].run(config)
        ray_rate = steady_rate("bench")
        mfu = summary["final"]["perf/mfu"]
        peak = measure_peak_flops(torch.device("cpu"))
        flops_per_token = train_flops_per_token(config.model, dataset.seq_len)

        # (d) generation: 4 prompts of different lengths, 64 new tokens, greedy, same weights.
        model.eval()
        hf.eval()
        prompts = [r[: n].tolist() for r, n in zip(batches[0][:4], (8, 16, 24, 32), strict=True)]
        new = 64

        def ours_generate():
            generate(model, prompts, new)

        def hf_generate():
            width = max(map(len, prompts))
            ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])
            mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=2, eos_token_id=None)

        gen = {}
        for name, fn in (("ours", ours_generate), ("hf", hf_generate)):
            with torch.no_grad():
                fn()
                times = []
                for _ in range(3):
                    start = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - start)
            gen[name] = len(prompts) * new / statistics.median(times)

        params = model.num_params()
        return "\n".join([
            "## Training and generation (CPU)",
            "",
            f"The demo model ({params / 1e6:.1f} M parameters: d_model {config.model.d_model}, "
            f"{config.model.n_layers} layers, {config.model.n_heads} heads / {config.model.n_kv_heads} kv heads, "
            f"vocab {config.model.vocab_size}), fp32, batch {config.train.global_batch} × {dataset.seq_len} tokens, "
            f"AdamW, {THREADS} threads, on the `stdlib` corpus. Step rates are medians over {STEPS - WARMUP} steps "
            "after warm-up (rows (a) and (a') median of 2 alternated runs).",
            "",
            "| comparison | raytrain | baseline | ratio | goal |",
            "|---|---:|---:|---:|---:|",
            f"| (a) training step, tokens/s: our model vs `transformers` LlamaForCausalLM (sdpa) | "
            f"{ours_rate:,.0f} | {hf_rate:,.0f} | **{ours_rate / hf_rate:.2f}×** | ≥ 1.2× |",
            f"| (a') the same with our blocks compiled (`parallel.compile=true`) vs `transformers` eager | "
            f"{compiled_rate:,.0f} | {hf_rate:,.0f} | **{compiled_rate / hf_rate:.2f}×** | ≥ 1.2× |",
            f"| (b) `raytrain pretrain` (1 Ray Train worker, Ray Data stream) vs the same loop in one process "
            "without Ray (`train/local.py`), "
            f"tokens/s | {ray_rate:,.0f} | {plain_rate:,.0f} | **{ray_rate / plain_rate:.2f}×** | ≥ 0.9× |",
            f"| (d) generation, new tokens/s: our KV cache vs `transformers` `generate` (greedy, 4 prompts, "
            f"{new} new tokens each) | {gen['ours']:,.0f} | {gen['hf']:,.0f} | **{gen['ours'] / gen['hf']:.2f}×** "
            "| ≥ 1.5× |",
            "",
            f"(c) MFU of the `raytrain pretrain` run: **{mfu:.1%}** of a measured fp32 matmul peak of "
            f"{peak / 1e9:.1f} GFLOP/s ({THREADS} threads, 1024² matrices), counting "
            f"{flops_per_token / 1e6:.1f} MFLOP per token (6·N + 12·L·d·T, `raytrain/model/flops.py`).",
        ])
    finally:
        shutil.rmtree(work, ignore_errors=True)
