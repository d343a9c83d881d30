"""The GPU check (bench/gpu_check.py), which only a GPU machine runs for real, runs here on a tiny model in a Python
where importing Ray or W&B fails (the GPU machines have neither), and writes every figure; bench/gpu.py renders
its JSON into BENCHMARKS.md's section."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs the module as `python3 -m bench.gpu_check` would, with `ray` and `wandb` unimportable.
WITHOUT_RAY = """
import importlib.abc, runpy, sys

class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("ray", "wandb"):
            raise ImportError(f"{name} is not installed on the GPU machine")
        return None

sys.meta_path.insert(0, NoRay())
sys.argv = ["bench.gpu_check", *sys.argv[1:]]
try:
    runpy.run_module("bench.gpu_check", run_name="__main__", alter_sys=True)
except SystemExit as done:
    code = done.code
else:
    code = 0
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("ray", "wandb"))
assert not loaded, loaded
sys.exit(code)
"""
SEQ_LENS, AC, GEN_BATCHES, GEN_DTYPES = [8, 16], ["none", "full"], [2], ["fp32", "bf16"]
TRAIN_FIGURES = ["build_s", "warmup_s", "flops_per_token", "loss", "mfu_datasheet", "mfu_measured_matmul",
                 "allocator_peak_gib", "plan_vs_measured"]


def run_check(out: Path) -> subprocess.CompletedProcess:
    args = ["--out", str(out), "--config", "tiny", "--seq-lens", ",".join(map(str, SEQ_LENS)),
            "--tokens-per-step", "64", "--ac", ",".join(AC), "--warmup", "1", "--steps", "2",
            "--gen-batches", ",".join(map(str, GEN_BATCHES)), "--gen-prompt", "4", "--gen-new", "4",
            "--gen-dtypes", ",".join(GEN_DTYPES), "--matmul-size", "64", "--matmul-s", "0.05",
            "model.vocab_size=512", "parallel.compile=false"]
    return subprocess.run([sys.executable, "-c", WITHOUT_RAY, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def test_gpu_check_runs_without_ray_on_a_tiny_model_and_its_section_renders(tmp_path, monkeypatch):
    out = tmp_path / "gpu.json"
    done = run_check(out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())

    assert results["schema"] == "raytrain.gpu_check/1" and results["errors"] == []
    assert {"type", "name", "torch", "cuda", "python"} <= set(results["device"])
    assert results["settings"]["seq_lens"] == SEQ_LENS and results["settings"]["tokens_per_step"] == 64
    assert results["peaks"]["datasheet_tflops"] > 0 and results["peaks"]["measured_bf16"]["tflops"] > 0

    # every sequence length × checkpointing mode, each with every figure, on the same tokens per step
    assert [(r["seq_len"], r["activation_checkpointing"]) for r in results["train"]] == [
        (seq, ac) for ac in AC for seq in SEQ_LENS]
    for r in results["train"]:
        assert r["status"] == "ok" and r["global_batch"] * r["seq_len"] == 64 == r["tokens_per_step"]
        assert all(math.isfinite(r[key]) for key in TRAIN_FIGURES), r
        for spread in (r["step_s"], r["tokens_per_s"]):
            assert 0 < spread["min"] <= spread["median"] <= spread["max"]
        assert r["plan_gib"]["total"] > 0 and r["allocator_peak_gib"] > 0
        assert r["mfu_datasheet"] == r["tokens_per_s"]["median"] * r["flops_per_token"] / (
            results["peaks"]["datasheet_tflops"] * 1e12)
    # checkpointing keeps fewer activations, in the plan and in what the worker counted
    by_mode = {ac: [r for r in results["train"] if r["activation_checkpointing"] == ac] for ac in AC}
    for with_ac, without in zip(by_mode["full"], by_mode["none"], strict=True):
        assert with_ac["plan_gib"]["activations"] < without["plan_gib"]["activations"]
        assert with_ac["allocator_peak_gib"] < without["allocator_peak_gib"]

    assert [(g["dtype"], g["batch"]) for g in results["generate"]] == [
        (d, b) for d in GEN_DTYPES for b in GEN_BATCHES]
    assert all(g["status"] == "ok" and g["tokens_per_s"] > 0 for g in results["generate"])
    assert "tokens/s (min–max)" in done.stdout and "plan vs alloc" in done.stdout

    import bench.gpu

    monkeypatch.setattr(bench.gpu, "RESULTS", out)
    section = bench.gpu.run()
    assert section.startswith("## GPU") and "Not a GPU run" in section
    assert section.count("| 8 | 8 |") == 2 and section.count("| 16 | 4 |") == 2  # seq len, batch; AC off and on
    assert "| fp32 | 2 |" in section and "| bf16 | 2 |" in section

    monkeypatch.setattr(bench.gpu, "RESULTS", tmp_path / "absent.json")
    missing = bench.gpu.run()
    assert missing.startswith("## GPU") and "Not measured yet" in missing and bench.gpu.COMMAND in missing
