"""bench/gpu_step.py, which only a GPU session can run for real, runs on CPU with a tiny model."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_step_benchmark_runs_on_a_tiny_model():
    out = subprocess.run([sys.executable, "-m", "bench.gpu_step", "--config", "tiny", "--steps", "7", "--seq-len", "32",
                          "train.global_batch=2", "parallel.compile=false"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "tokens/s" in out.stdout and "raytrain plan estimates" in out.stdout
