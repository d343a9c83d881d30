"""The ~1B model's training step on one GPU, without Ray: tokens/s, MFU, and memory against the plan.

The device machines lent to this project hold PyTorch and CUDA but not Ray, and nothing can
be installed there, so this times what a worker runs per step: the model, parallelize() with
per-block torch.compile, bf16 autocast, clipping and AdamW, on random tokens (speed does not
depend on them). Ray's share of a step is measured on CPU (BENCHMARKS.md, (b)); `bench/gpu.sh`
runs the whole `raytrain pretrain` where Ray is installed. It also compares the allocator's
peak with `raytrain plan`'s estimate for the same layout (bf16, one rank).

    python3 -m bench.gpu_step [--steps N] [--seq-len L] [key=value ...]    (about 3 minutes on an H200)
"""

from __future__ import annotations

import argparse

import torch

from bench.steps import WARMUP, step_rate
from raytrain.config import load_config
from raytrain.model.flops import train_flops_per_token
from raytrain.model.transformer import Transformer
from raytrain.parallel.layout import build_layout, parallelize
from raytrain.parallel.plan import plan_ranks
from raytrain.train.metrics import peak_flops

# The llama-1b preset at a 32k vocabulary, as bench/gpu.sh trains it.
DEFAULTS = ["model.vocab_size=32768", "train.precision=bf16", "parallel.compile=true", "train.global_batch=16",
            "parallel.workers=1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="llama-1b")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = load_config(args.config, [*DEFAULTS, *args.overrides])
    planned_gib = plan_ranks(config, 1, args.seq_len)[0].total_gib
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with device:
        model = Transformer(config.model)
    model.init_weights(0)
    module = parallelize(model, config.parallel, build_layout(config.parallel, 1, device), device,
                         bf16=config.train.precision == "bf16")
    generator = torch.Generator(device).manual_seed(0)
    batches = [torch.randint(0, config.model.vocab_size, (config.train.global_batch, args.seq_len + 1),
                             device=device, generator=generator) for _ in range(args.steps)]

    def logits_of(m, inputs):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.train.precision == "bf16"):
            return m(inputs)

    rate = step_rate(module, batches, logits_of, config)
    peak, source = peak_flops(device, config.train.peak_tflops)
    mfu = rate * train_flops_per_token(config.model, args.seq_len) / peak
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    print(f"{args.config}: {model.num_params() / 1e9:.2f} B parameters, batch {config.train.global_batch} × "
          f"{args.seq_len} tokens, {config.train.precision}, compile {config.parallel.compile}, on {name}")
    print(f"training step: {rate:,.0f} tokens/s (median of {args.steps - WARMUP} steps after {WARMUP} warm-up), "
          f"MFU {mfu:.1%} of {peak / 1e12:.3g} TFLOP/s ({source})")
    print(f"memory: {memory:.1f} GiB peak allocated; raytrain plan estimates {planned_gib:.1f} GiB "
          f"({planned_gib / memory - 1:+.0%})")


if __name__ == "__main__":
    main()
