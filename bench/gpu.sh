#!/usr/bin/env bash
# GPU benchmark: a ~1B Llama-shaped model (the llama-1b preset) trained on one GPU with bf16 and
# torch.compile; prints training tokens/s and MFU (against the GPU's bf16 data-sheet peak).
# Fits in 10 minutes on one H200. Run from the repository root on a machine with a CUDA GPU:
#   bash bench/gpu.sh            (TORCH="torch==2.13.0 --index-url <CUDA wheel index>" to pick the build)
# One worker needs no sharding, so FSDP2 is not applied; `parallel.workers=N` on N GPUs adds it.
# Without Ray on the machine (the device machines lent here): `python3 -m bench.gpu_step` times the same step.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=disabled
[ -x .venv/bin/raytrain ] || make setup TORCH="${TORCH:-torch==2.13.0}"
RUN="${OUT:-runs}/gpu-bench"
.venv/bin/raytrain data tokenizer --input stdlib --vocab-size 32768 --out "$RUN/tok" --overwrite runtime.progress=false
.venv/bin/raytrain data prepare --input stdlib --tokenizer "$RUN/tok" --seq-len 2048 --out "$RUN/data" \
  --overwrite runtime.progress=false
rm -rf "$RUN/llama-1b"
.venv/bin/raytrain pretrain --config llama-1b --data "$RUN/data" --name llama-1b run.root="$RUN" \
  parallel.workers=1 parallel.use_gpu=true parallel.compile=true train.precision=bf16 \
  model.vocab_size=32768 train.global_batch=16 train.steps=60 train.warmup_steps=10 train.log_every=10 \
  train.val_every=0 train.checkpoint_every=60 tracking.mode=disabled
.venv/bin/python - "$RUN/llama-1b" <<'PY'
import json, statistics, sys
records = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
steady = [r for r in records if "train/loss" in r][1:]  # the first interval holds compilation
print(f"llama-1b on one GPU, bf16 + compile: {statistics.median(r['perf/tokens_per_s'] for r in steady):,.0f} "
      f"tokens/s, MFU {statistics.median(r['perf/mfu'] for r in steady):.1%}, "
      f"peak memory {max(r['mem/tensor_peak_gib'] for r in steady):.1f} GiB of tensors, "
      f"{max(r['mem/peak_gib'] for r in steady):.1f} GiB reserved")
PY
