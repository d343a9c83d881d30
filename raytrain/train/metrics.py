"""Metric names, metrics.jsonl, the progress line and W&B, all from world rank 0."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from raytrain import storage
from raytrain.train.memory import host_peak_rss_gib

log = logging.getLogger("raytrain")
# The metric names every stage's loop logs; each stage adds its objective's and its batch source's (the stage
# registry, raytrain/stages/, lists a stage's whole set: code, dashboards and tests read them there).
LOOP_METRICS = (
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/tokens_seen",
    "perf/tokens_per_s",
    "perf/tokens_per_s_per_worker",
    "perf/mfu",
    "perf/step_time_s",
    "perf/data_wait_frac",
    "mem/peak_gib",
    "mem/tensor_peak_gib",
    "mem/init_base_rss_gib",
    "mem/init_peak_rss_gib",
    "mem/init_plan_gib",
)
METRICS_FILE = "metrics.jsonl"
# Dense bf16 peak per device, from the vendors' data sheets (TFLOP/s).
DEVICE_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 125.0}


def measure_peak_flops(device: torch.device, seconds: float = 0.3) -> float:
    """Matmul FLOP/s this worker reaches on square fp32 matrices (CPU) — the MFU denominator. Every run's workers
    measure it at start, so it is brief: 0.3 s holds a dozen 1024² products on 2 cores, within a few % of 1 s's."""
    size = 1024
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * runs / (time.perf_counter() - start)


def peak_flops(device: torch.device, configured_tflops: float) -> tuple[float, str]:
    """(peak FLOP/s per worker, where the number comes from)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12, "configured (train.peak_tflops)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in DEVICE_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name} bf16 data sheet"
    return measure_peak_flops(device), f"measured fp32 matmul on {device.type}"


def peak_memory_gib(device: torch.device) -> float:
    """What the worker holds at most: the CUDA allocator's reserved bytes, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    return host_peak_rss_gib()


def tensor_peak_gib(device: torch.device, memory) -> dict[str, float]:
    """The most tensor bytes alive at once (what `raytrain plan` estimates), where it is known."""
    if device.type == "cuda":
        return {"mem/tensor_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"mem/tensor_peak_gib": memory.peak / 2**30} if memory is not None else {}


def wandb_mode(mode: str) -> str | None:
    if mode == "disabled":
        return None
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class StepLog:
    """A JSONL file of a run folder whose records carry their step (metrics.jsonl, PPO's samples.jsonl).

    On resume, records past the resume step are dropped (the run logs them again). A run folder on object storage
    (a URI) has no append: the file is kept in this node's `local_dir` and uploaded whole after each append."""

    def __init__(self, run_dir: str | Path, name: str, local_dir: Path, resume_step: int):
        self.logged = storage.join(run_dir, name)
        self.remote = storage.is_uri(run_dir)
        self.path = local_dir / name
        if storage.is_file(self.logged):
            kept = [line for line in storage.read_text(self.logged).splitlines()
                    if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
            self._upload()
        elif self.remote:
            self.path.unlink(missing_ok=True)  # left in the mirror by an earlier run of this URI

    def append(self, records: list[dict]) -> None:
        with self.path.open("a") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
        self._upload()

    def _upload(self) -> None:
        if self.remote:
            storage.write_text(self.logged, self.path.read_text())


class MetricsLog:
    """Appends to RUN/metrics.jsonl and W&B (a run folder on object storage: W&B's files uploaded at the end)."""

    def __init__(self, run_dir: str | Path, resume_step: int, tracking, config: dict, run_name: str,
                 job_type: str, quiet: bool):
        self.run_dir = str(run_dir)
        self.remote = storage.is_uri(run_dir)
        # Files a URI run folder cannot have written in place (W&B's, the JSONL logs) live in this node's folder.
        self.local_dir = local_mirror(self.run_dir) if self.remote else Path(run_dir)
        self.metrics = StepLog(self.run_dir, METRICS_FILE, self.local_dir, resume_step)
        self.wandb = None
        mode = wandb_mode(tracking.mode)
        if mode:
            import wandb

            # Quiet: W&B's banner and end-of-run tables would drown the progress lines; one line says where.
            self.wandb = wandb.init(project=tracking.project, name=run_name, id=_wandb_id(self.run_dir),
                                    group=tracking.group or None, job_type=job_type,
                                    resume="allow", dir=str(self.local_dir), config=config, mode=mode,
                                    settings=wandb.Settings(silent=quiet, **_FLUSH_OFTEN))
            if quiet:
                offline = f"offline in {Path(self.wandb.dir).parent} (`wandb sync` uploads it)"
                log.info(f"[raytrain] W&B run {self.wandb.url if mode == 'online' else offline}")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.append([{"step": step, **metrics}])
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            if self.remote:
                storage.copy_tree(self.local_dir / "wandb", storage.join(self.run_dir, "wandb"))


def local_mirror(run_dir: str) -> Path:
    """This node's folder for the files of a run on object storage that must be written in place."""
    import hashlib
    import tempfile

    folder = Path(tempfile.gettempdir()) / "raytrain-runs" / hashlib.sha1(run_dir.encode()).hexdigest()[:12]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# A run killed from outside (a sweep trial stopped by ASHA, a lost worker) keeps in its .wandb file what was
# flushed by then: every second rather than W&B's default 15 s.
_FLUSH_OFTEN = {"x_transaction_log_flush_interval": 1.0}


def _wandb_id(run_dir: str) -> str:
    """The same W&B run across resumes: from the run folder's absolute path or URI."""
    import hashlib

    return hashlib.sha1(run_dir.encode()).hexdigest()[:12]


def progress_line(step: int, total: int, metrics: dict[str, float], elapsed: float, done_here: int) -> str:
    eta = elapsed / max(1, done_here) * (total - step)
    parts = [f"step {step}/{total}", f"loss {metrics['train/loss']:.4f}", f"lr {metrics['train/lr']:.2e}",
             f"{metrics['perf/tokens_per_s']:,.0f} tok/s", f"mfu {metrics['perf/mfu']:.1%}",
             f"data wait {metrics['perf/data_wait_frac']:.0%}", f"eta {_duration(eta)}"]
    if "val/loss" in metrics:
        parts.insert(2, f"val {metrics['val/loss']:.4f}")
    if "val/accuracy" in metrics:  # a reward model's held-out pairwise accuracy
        parts.insert(3, f"val acc {metrics['val/accuracy']:.3f}")
    if "ppo/reward_mean" in metrics:  # PPO: the reward it climbs and how far it moved from the reference
        parts[2:2] = [f"reward {metrics['ppo/reward_mean']:+.3f}", f"kl {metrics['ppo/kl']:.3f}"]
    if "val/reward_mean" in metrics:
        parts.insert(4, f"val reward {metrics['val/reward_mean']:+.3f}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def write_summary(run_dir: str | Path, checkpoint: str | None, wall_s: float) -> dict:
    """summary.json from the run's metrics.jsonl (also written by a sweep for a trial stopped at a report)."""
    records = [json.loads(line) for line in storage.read_text(storage.join(run_dir, METRICS_FILE)).splitlines()
               if line]
    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if any(key.startswith("val/") for key in r)]
    tokens = train[-1]["train/tokens_seen"] if train else 0
    summary = {
        "steps": train[-1]["step"] if train else 0,
        "tokens_seen": tokens,
        "wall_s": round(wall_s, 2),
        "tokens_per_s": round(sum(r["perf/tokens_per_s"] for r in train) / len(train), 1) if train else 0.0,
        "final": train[-1] if train else {},
        "val_first": val[0] if val else {},
        "val_last": val[-1] if val else {},
        "checkpoint": checkpoint,
    }
    storage.write_text(storage.join(run_dir, "summary.json"), json.dumps(summary, indent=2))
    return summary
