"""The one per-worker training loop, run by every Ray Train worker.

Gradient accumulation, clipping, the LR schedule, validation, checkpoints, metrics and the
report cadence live here once; a stage contributes its data and its objective (inputs and
targets, the model head, the loss and its metrics). The loss is a sum (over target tokens, or
ranked pairs) divided by its count over the whole global batch, so a step computes the same
gradient under any data-parallel layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raytrain import storage
from raytrain.config import Config, config_from_dict
from raytrain.data.manifest import PreparedDataset
from raytrain.data.stream import BatchOrder, stream_batches
from raytrain.evaluate import forward_loss_sums, split_sums, with_reference
from raytrain.model.flops import train_flops_per_token
from raytrain.model.transformer import Transformer
from raytrain.parallel.grad_norm import clip_grad_norm
from raytrain.parallel.layout import build_layout, gradient_sync, parallelize, plain_ddp
from raytrain.parallel.pipeline import CallWithCausal, build_schedule, build_stage_parts
from raytrain.parallel.tensor_parallel import loss_context
from raytrain.runtime import configure_ray_data, configure_worker_logging
from raytrain.train.checkpoint import (
    latest_checkpoint,
    load_training_checkpoint,
    load_weights,
    save_training_checkpoint,
)
from raytrain.train.memory import TensorMemory, training_tensors
from raytrain.train.metrics import MetricsLog, peak_flops, peak_memory_gib, progress_line, tensor_peak_gib
from raytrain.train.objectives import build_objective, score_statistics
from raytrain.train.optim import build_optimizer, lr_at

FAILED_ONCE_MARKER = ".debug_failed_once"
# A logger, not print: Ray Train tees print when a library (W&B) wraps stdout, doubling lines.
log = logging.getLogger("raytrain")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def train_worker(loop_config: dict) -> None:
    config = config_from_dict(loop_config["config"])
    Worker(config, loop_config["run_dir"]).run()


class Worker:
    def __init__(self, config: Config, run_dir: str):
        """run_dir: the run folder, a path or a URI."""
        self.config = config
        self.train = config.train
        self.run_dir = run_dir
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.set_num_threads(max(1, int(config.parallel.cpus_per_worker)))
        configure_worker_logging(config.runtime)
        configure_ray_data(dataclasses.replace(config.runtime, progress=False))
        self.layout = build_layout(config.parallel, self.world, self.device)
        self._open_data()
        self.bf16 = self.train.precision == "bf16"
        # CUDA's allocator counts tensor memory itself; on CPU a dispatch mode does, when asked (it is slow).
        self.memory = TensorMemory() if config.debug.track_memory and self.device.type != "cuda" else None
        self.split_loss = self.layout.tp > 1 and config.parallel.loss_parallel and self.objective.head == "lm"

        self._build_model()
        self.reference = self._build_reference()
        self.resumed: dict = {}  # the checkpoint's raytrain.json when resuming
        self.start_step = self._restore()
        self.tokens_per_step = self.train.global_batch * self.seq_len
        self.flops_per_token = self._flops_per_token()
        self.log = None
        if self.rank == 0:
            self.peak, self.peak_source = peak_flops(self.device, self.train.peak_tflops)
            params = sum(p.numel() for part in self.parts for p in part.parameters())
            log.info(f"{self.tag} {self.world} worker(s) on {self.device.type}, {params:,} parameters on rank 0, "
                     f"MFU against {self.peak / 1e12:.2f} TFLOP/s per worker ({self.peak_source}); starting at step "
                     f"{self.start_step}")
            self.log = MetricsLog(run_dir, self.start_step, config.tracking, config.to_dict(), config.run.name,
                                  config.train.stage, quiet=config.runtime.log_level not in ("debug", "info"))

    def _open_data(self) -> None:
        """The stage's data and objective: prepared rows, their batch order and what the loss is."""
        self.dataset = PreparedDataset.open(self.train.data)
        self.seq_len = self.dataset.seq_len
        self.order = BatchOrder(self.dataset.split("train").num_rows, self.train.global_batch, self.train.seed)
        self.local_batch = self.order.local_batch(self.layout.dp)
        special = self.dataset.manifest["tokenizer"]["special_tokens"]
        # Pad per batch, except under pipelining, whose stages keep the shapes of their first step.
        self.objective = build_objective(self.train.objective, seed=self.train.seed,
                                         global_batch=self.train.global_batch, mask_fraction=self.train.mask_fraction,
                                         special=special, multiple=self.layout.tp if self.layout.pp == 1 else 0,
                                         dpo_beta=self.train.dpo_beta)
        self.has_val = self.dataset.split("val").num_rows > 0

    def _flops_per_token(self) -> float:
        return train_flops_per_token(self.config.model, self.seq_len, self.objective.head)

    def _build_model(self) -> None:
        """The model parts this rank holds (the whole model, or its pipeline stages), parallelized."""
        parallel, layout = self.config.parallel, self.layout
        if layout.pp > 1:
            stages = build_stage_parts(self.config.model, self.train.seed, layout.pp, layout.pp_rank,
                                       parallel.pp_virtual_stages, parallel.pp_layers)
        else:
            model = Transformer(self.config.model, head=self.objective.head)
            model.init_weights(self.train.seed)
            stages = [(0, model)]
        self.parts = [part.to(self.device) for _, part in stages]
        self.modules = [parallelize(part, parallel, layout, self.device, self.bf16) for part in self.parts]
        self.optimizers = [build_optimizer(part, self.train) for part in self.parts]
        n_stages = layout.pp * parallel.pp_virtual_stages
        self.last_stage = any(index == n_stages - 1 for index, _ in stages)
        self.schedule = None
        if layout.pp > 1:
            wrapped = [(index, CallWithCausal(module, self.objective.causal))
                       for (index, _), module in zip(stages, self.modules, strict=True)]
            self.schedule = build_schedule(parallel.pp_schedule, wrapped, n_stages, self.device, layout.pp_group,
                                           self.train.micro_batches, self._pipeline_loss)
        self.loss_scale = 1.0

    def _build_reference(self) -> torch.nn.Module | None:
        """DPO's frozen reference: the starting model (train.init_from), in the policy's layout, never updated.
        A restart loads it from there again, so it is not part of the checkpoints."""
        if not self.objective.reference:
            return None
        model = Transformer(self.config.model).to(self.device)
        # Sharded like the policy; under plain replication it stays a bare copy (DDP is for gradients).
        module = model if plain_ddp(self.config.parallel) else parallelize(model, self.config.parallel, self.layout,
                                                                           self.device, self.bf16)
        load_weights(self.train.init_from, module)
        return module.requires_grad_(False).eval()

    def _restore(self) -> int:
        """Resume from the run folder's latest complete checkpoint (rank 0 picks it for all), else start fresh."""
        folder = self._broadcast(latest_checkpoint(self.run_dir) if self.rank == 0 else None)
        if folder is None:
            self._start_fresh()
            return 0
        with storage.local_copy(folder) as local:
            self.resumed = load_training_checkpoint(local, self.modules, self.optimizers)
        self._note_debug_resume()
        return self.resumed["step"]

    def _start_fresh(self) -> None:
        """A new run's weights: train.init_from's, or the random initialisation."""
        if self.train.init_from:
            for module in self.modules:
                load_weights(self.train.init_from, module)

    def _broadcast(self, value):
        """Rank 0's value on every rank."""
        if self.world > 1:
            holder = [value]
            dist.broadcast_object_list(holder, src=0)
            value = holder[0]
        return value

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @contextlib.contextmanager
    def compute(self):
        """Where a pipeline schedule or an evaluation runs: bf16 autocast and loss parallel, when on."""
        with self.autocast(), loss_context(self.split_loss):
            yield

    @property
    def tag(self) -> str:
        """What rank 0's lines start with; a sweep's trials print side by side, so theirs name the trial."""
        return f"[raytrain {self.config.run.name}]" if self.config.tracking.group else "[raytrain]"

    def run(self) -> None:
        steps = self.train.steps
        stream = stream_batches(self.dataset, self.order, consumer=self.layout.dp_rank, num_consumers=self.layout.dp,
                                start_step=self.start_step, num_steps=steps - self.start_step)
        # the objective's [loss sum, count, …], then input positions computed (fewer than rows × seq_len when
        # padding is trimmed)
        interval = None
        timer = {"compute": 0.0, "data": 0.0, "steps": 0}
        started = time.perf_counter()
        metrics: dict[str, float] = {}
        if self.start_step == 0 and self.has_val and self.train.val_every > 0:
            self._log(0, self._validate())
        for step in range(self.start_step, steps):
            self._debug_hooks(step)
            tick = time.perf_counter()
            _, rows = next(stream)
            timer["data"] += time.perf_counter() - tick
            with self._tracked_memory():
                sums = self._train_step(step, torch.from_numpy(rows).long().to(self.device))
            interval = sums if interval is None else interval + sums
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            timer["compute"] += time.perf_counter() - tick
            timer["steps"] += 1
            done = step + 1
            last = done == steps
            if done % self.train.log_every == 0 or last:
                metrics = self._interval_metrics(step, interval, timer)
                if self.has_val and (last or (self.train.val_every and done % self.train.val_every == 0)):
                    metrics.update(self._validate())
                self._log(done, metrics, started)
                interval = None
                timer = {"compute": 0.0, "data": 0.0, "steps": 0}
            if done % self.train.checkpoint_every == 0 or last:
                self._checkpoint(done, metrics)
        if self.log is not None:
            self.log.close()

    def _tracked_memory(self):
        if self.memory is None:
            return contextlib.nullcontext()
        self.memory.track(training_tensors(self.parts, self.optimizers))
        return self.memory

    def _train_step(self, step: int, rows: torch.Tensor) -> torch.Tensor:
        """One optimizer step; returns [loss sum, target count, positions] where this rank computed the loss."""
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, self.train)
        first_row = self.layout.dp_rank * self.local_batch
        if self.schedule is not None:
            sums = self._pipeline_step(step, rows, first_row)
        else:
            sums = self._accumulate_step(step, rows, first_row)
        max_norm = self.train.grad_clip if self.train.grad_clip > 0 else float("inf")
        params = [p for part in self.parts for p in part.parameters()]
        self.grad_norm = clip_grad_norm(params, max_norm, self.layout.pp_group)
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return sums

    def _global_count(self, targets: list[torch.Tensor]) -> torch.Tensor:
        """What the loss is a sum over (target tokens, or ranked pairs) in the whole global batch (every pp
        and tp rank holds the same targets)."""
        counts = torch.stack([self.objective.count(t) for t in targets]).sum().double()
        return all_reduce_sum(counts) / (self.layout.tp * self.layout.pp)

    def _accumulate_step(self, step: int, rows: torch.Tensor, first_row: int) -> torch.Tensor:
        (module,) = self.modules
        micro = rows.chunk(self.train.micro_batches)
        pairs = [with_reference(self.objective, self.reference, *self.objective(m, step, first_row + i * len(micro[0])),
                                self.compute) for i, m in enumerate(micro)]
        global_count = self._global_count([t for _, t in pairs])
        sums = 0
        for i, (inputs, targets) in enumerate(pairs):
            with gradient_sync(module, i == len(pairs) - 1), loss_context(self.split_loss):
                with self.autocast():
                    loss, counted = self.objective.loss(module(inputs, causal=self.objective.causal), targets)
                # Gradient averaging over data-parallel ranks divides by dp; this makes it a global mean.
                (loss * self.layout.dp / global_count).backward()
            positions = counted.new_tensor([inputs.numel()])
            sums = sums + torch.cat([loss.detach().double().reshape(1), counted, positions])
        return sums

    def _pipeline_step(self, step: int, rows: torch.Tensor, first_row: int) -> torch.Tensor:
        inputs, targets = self.objective(rows, step, first_row)
        self.loss_scale = float(self.layout.dp / self._global_count([targets]))
        losses: list[torch.Tensor] = []
        with self.compute():
            self.schedule.step(inputs, target=targets, losses=losses)
        loss_sum, count = self._pipeline_sums(losses, targets)
        return torch.stack([loss_sum, count, count.new_tensor(inputs.numel() if self.last_stage else 0)])

    def _pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The schedule's loss_fn: this micro-batch's share of the global token mean."""
        return self.objective.loss(logits, targets)[0] * self.loss_scale

    def _pipeline_sums(self, losses: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sum, count) from the losses the schedule collected; zeros off the last stage.

        Taken from the schedule's list rather than counted inside loss_fn, which the schedule
        also calls on placeholder tensors while it infers shapes.
        """
        if not self.last_stage:
            zero = torch.zeros((), dtype=torch.float64, device=self.device)
            return zero, zero
        loss_sum = torch.stack([loss.detach().double() for loss in losses]).sum() / self.loss_scale
        return loss_sum, self.objective.count(targets).double()

    def _pipeline_eval(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.loss_scale = 1.0
        losses: list[torch.Tensor] = []
        with self.compute():
            self.schedule.eval(inputs, target=targets, losses=losses)
        return torch.stack(self._pipeline_sums(losses, targets))

    def dp_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum the objective's sums over data-parallel ranks: only last-stage ranks hold them, tp ranks copies."""
        return all_reduce_sum(tensor.clone()) / self.layout.tp

    def _interval_metrics(self, step: int, interval: torch.Tensor, timer: dict) -> dict[str, float]:
        totals = self.dp_sum(interval)
        tokens_per_s = float(totals[-1]) / max(timer["compute"], 1e-9)
        per_worker = tokens_per_s / self.world
        return {
            **self.objective.metrics(totals[:-1], "train"),
            "train/lr": lr_at(step, self.train),
            "train/grad_norm": float(self.grad_norm),
            "train/tokens_seen": float((step + 1) * self.tokens_per_step),
            "perf/tokens_per_s": tokens_per_s,
            "perf/tokens_per_s_per_worker": per_worker,
            "perf/mfu": per_worker * self.flops_per_token / self.peak if self.rank == 0 else 0.0,
            "perf/step_time_s": timer["compute"] / max(1, timer["steps"]),
            "perf/data_wait_frac": timer["data"] / max(timer["compute"], 1e-9),
            "mem/peak_gib": peak_memory_gib(self.device),
            **tensor_peak_gib(self.device, self.memory),
        }

    def _validate(self) -> dict[str, float]:
        if self.schedule is not None:
            sums_of = self._pipeline_eval
        else:
            sums_of = forward_loss_sums(self.modules[0], self.objective, self.compute, self.reference)
        totals = self._split_sums(sums_of, "val", self.train.val_batches)
        return self.objective.metrics(totals, "val")

    def _split_sums(self, sums_of, split: str, batches: int) -> torch.Tensor:
        """sums_of summed over a split's batches and the data-parallel ranks, in eval mode."""
        for module in self.modules:
            module.eval()
        totals = split_sums(self.dataset, self.objective, sums_of, split=split, batches=batches,
                            global_batch=self.train.global_batch, consumer=self.layout.dp_rank,
                            num_consumers=self.layout.dp, device=self.device)
        for module in self.modules:
            module.train()
        return self.dp_sum(totals)

    def _score_statistics(self) -> dict[str, float]:
        """A reward model's score mean and std over every response of the train split, for PPO to normalise."""
        (module,) = self.modules

        def sums_of(inputs: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
            with self.compute():
                return self.objective.score_sums(module(inputs, causal=True), ends)

        return score_statistics(self._split_sums(sums_of, "train", 0))

    def _log(self, step: int, metrics: dict[str, float], started: float | None = None) -> None:
        if self.log is None:
            return
        self.log.log(step, metrics)
        if "train/loss" in metrics:
            elapsed = time.perf_counter() - started
            log.info(f"{self.tag} " + progress_line(step, self.train.steps, metrics, elapsed, step - self.start_step))
        else:
            log.info(f"{self.tag} step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def _checkpoint_meta(self, step: int) -> dict:
        meta = {
            "step": step,
            "model": vars(self.config.model),
            "objective": self.train.objective,
            "mask_fraction": self.train.mask_fraction,
            "tokens_seen": step * self.tokens_per_step,
            "data": str(self.dataset.root),
            "tokenizer": self.dataset.manifest["tokenizer"],
            "seed": self.train.seed,
            "world_size": self.world,
        }
        if self.objective.head == "score":
            meta["reward"] = self._score_statistics()
        return meta

    def _checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        meta = self._checkpoint_meta(step)
        with tempfile.TemporaryDirectory(prefix="raytrain-ckpt-") as folder:
            save_training_checkpoint(Path(folder), self.modules, self.optimizers, meta, self.rank == 0)
            ray.train.report({"step": step, **metrics},
                             checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"step_{step:06d}")

    def _note_debug_resume(self) -> None:
        """After debug.fail_at_step's exit, the marker records the step the run resumed from (tests read it)."""
        marker = storage.join(self.run_dir, FAILED_ONCE_MARKER)
        if self.rank == 0 and self.config.debug.fail_at_step >= 0 and storage.exists(marker):
            storage.write_text(marker, f"resumed from step {self.resumed['step']}\n")

    def _debug_hooks(self, step: int) -> None:
        """debug.step_sleep_s, then debug.fail_at_step."""
        debug = self.config.debug
        time.sleep(debug.step_sleep_s)
        marker = storage.join(self.run_dir, FAILED_ONCE_MARKER)
        if step == debug.fail_at_step and self.rank == debug.fail_rank and not storage.exists(marker):
            storage.write_text(marker, "")
            log.info(f"[raytrain] debug.fail_at_step: worker {self.rank} exits at step {step}")
            os._exit(1)
