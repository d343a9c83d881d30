"""The one per-worker training loop, for every stage, inside Ray Train, under torchrun or in one process.

Gradient accumulation, clipping, the LR schedule, validation, checkpoints, metrics and the report cadence live
here once. A stage (raytrain/stages/) contributes its batch source (prepared rows, or PPO's experience), its
objective (inputs and targets, the model head, the loss and its metrics) and a few hooks (a frozen reference,
extra checkpoint facts). The loss is a sum (over target tokens, or ranked pairs) divided by its count over the
whole global batch, so a step computes the same gradient under any data-parallel layout.

The loop runs in rounds: a round is one step of pre-training or fine-tuning, one iteration (rollout, then
epochs × minibatches steps) of PPO; train.log_every, val_every and checkpoint_every count rounds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from raytrain import storage
from raytrain.config import Config
from raytrain.model.lora import apply_lora, quantize_base
from raytrain.model.transformer import INIT_BLOCK_VALUES, Transformer
from raytrain.parallel.grad_norm import clip_grad_norm
from raytrain.parallel.layout import build_layout, gradient_sync, parallelize
from raytrain.parallel.materialize import local_slices, materialize
from raytrain.parallel.pipeline import CallWithCausal, build_schedule, parts_on_meta
from raytrain.parallel.tensor_parallel import loss_context
from raytrain.train.checkpoint import (
    latest_checkpoint,
    load_training_checkpoint,
    load_weights,
    save_training_checkpoint,
)
from raytrain.train.evaluate import with_reference, with_reference_point
from raytrain.train.memory import TensorMemory, host_rss_gib, training_tensors
from raytrain.train.metrics import MetricsLog, peak_flops, peak_memory_gib, progress_line, tensor_peak_gib
from raytrain.train.optim import build_optimizer, lr_at
from raytrain.train.packing import model_call

FAILED_ONCE_MARKER = ".debug_failed_once"
# A logger, not print: Ray Train tees print when a library (W&B) wraps stdout, doubling lines.
log = logging.getLogger("raytrain")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


@dataclass(frozen=True)
class WorkerContext:
    """Where a worker runs, given to it: its rank, the world, its device, whether its batches stream through Ray
    Data, and how a finished checkpoint folder (this rank's files) is handed over: Ray Train's report, or a copy
    into the run folder."""

    rank: int
    world: int
    device: torch.device
    ray_data: bool
    publish: Callable[[Path, int, dict], None]  # (local folder, step, metrics)


class Worker:
    def __init__(self, config: Config, run_dir: str, stage, context: WorkerContext, extras: dict | None = None):
        """run_dir: the run folder, a path or a URI; stage: its Stage (raytrain/stages/); extras: what the stage's
        hooks need beside the config (PPO: its actor pools)."""
        self.config, self.stage, self.context = config, stage, context
        self.train = config.train
        self.run_dir = run_dir
        self.extras = extras or {}
        self.rank, self.world, self.device = context.rank, context.world, context.device
        torch.set_num_threads(max(1, int(config.parallel.cpus_per_worker)))
        self.layout = build_layout(config.parallel, self.world, self.device)
        self.bf16 = self.train.precision == "bf16"
        self.source = stage.batch_source(self)
        self.objective = self.source.objective
        # CUDA's allocator counts tensor memory itself; on CPU a dispatch mode does, when asked (it is slow).
        self.memory = TensorMemory() if config.debug.track_memory and self.device.type != "cuda" else None
        self.split_loss = self.layout.tp > 1 and config.parallel.loss_parallel and self.objective.head == "lm"

        before = host_rss_gib()
        self.parts, self.modules, stage_ids = stage.build_model(self)
        self.optimizers = [build_optimizer(part, self.train) for part in self.parts]
        self._build_schedule(stage_ids)
        self.reference = stage.build_reference(self)
        self.start_step = self._restore()
        # QLoRA: the base in int8 once it is loaded (a resume loads it in full precision first).
        quantized = [quantize_base(module, self.train.lora) for module in self.modules]
        self.init_memory = self._init_memory(before)
        self.tokens_per_step = self.train.global_batch * self.source.seq_len
        self.flops_per_token = self.source.flops_per_token()
        self.log = None
        if self.rank == 0:
            self.peak, self.peak_source = peak_flops(self.device, self.train.peak_tflops)
            params = sum(p.numel() for part in self.parts for p in part.parameters())
            trained = sum(p.numel() for part in self.parts for p in part.parameters() if p.requires_grad)
            before, after = (sum(pair[i] for pair in quantized) / 2**20 for i in (0, 1))
            int8 = f"the adapted weights in int8 ({after:.1f} MiB, were {before:.1f}), " if after else ""
            log.info(f"{self.tag} {self.world} worker(s) on {self.device.type}, {params:,} parameters on rank 0 "
                     f"({trained:,} trained), {int8}"
                     f"MFU against {self.peak / 1e12:.2f} TFLOP/s per worker ({self.peak_source}); starting at step "
                     f"{self.start_step}; " + self._init_memory_line())
            self.log = MetricsLog(run_dir, self.start_step, config.tracking, config.to_dict(), config.run.name,
                                  stage.name, quiet=config.runtime.log_level not in ("debug", "info"))

    # -- the model --------------------------------------------------------------------------------------

    def build_parts(self) -> tuple[list[torch.nn.Module], list[torch.nn.Module], list[int]]:
        """The model parts this rank holds (the whole model, or its pipeline stages), their parallelized modules
        and their pipeline stage indices: what a stage's build_model hook returns unless it builds its own."""
        stages = parts_on_meta(self.config.model, self.config.parallel, self.layout.pp_rank, self.objective.head)
        parts = [part for _, part in stages]
        for part in parts:
            apply_lora(part, self.train.lora)
        return parts, [self.parallelize(part, self.train.seed) for part in parts], [index for index, _ in stages]

    def parallelize(self, part: Transformer, seed: int, trainable: bool = True) -> torch.nn.Module:
        """A part built on the meta device, laid out, then this rank's shards allocated and seeded
        (parallel/materialize.py); a frozen model (trainable=False) is never wrapped for gradients."""
        return parallelize(part, self.config.parallel, self.layout, self.device, self.bf16,
                           fill=lambda laid_out: materialize(laid_out, self.device, seed), trainable=trainable)

    def _init_memory(self, before: float) -> dict[str, float]:
        """What building and loading the model cost in host memory, the most over ranks: the resident set before
        it and the process's peak after it; beside them what `raytrain plan` reckons for it (the rank's shards
        in fp32 and one block of seeded values or one stored slice; on GPU the shards are on the device)."""
        modules = [*self.modules, *([self.reference] if self.reference is not None else [])]
        local = [local_slices(p)[1].numel() for module in modules for p in module.parameters()]
        planned = 4 * max(INIT_BLOCK_VALUES, *local) + (4 * sum(local) if self.device.type == "cpu" else 0)
        figures = torch.tensor([before, peak_memory_gib(torch.device("cpu")), planned / 2**30], dtype=torch.float64,
                               device=self.device)
        if self.world > 1:
            dist.all_reduce(figures, op=dist.ReduceOp.MAX)
        return {"mem/init_base_rss_gib": float(figures[0]), "mem/init_peak_rss_gib": float(figures[1]),
                "mem/init_plan_gib": float(figures[2])}

    def _init_memory_line(self) -> str:
        memory = self.init_memory
        base, peak, plan = (memory[f"mem/init_{k}"] for k in ("base_rss_gib", "peak_rss_gib", "plan_gib"))
        gpu = (f", the GPU's allocator {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB"
               if self.device.type == "cuda" else "")
        return (f"building and loading the model took host memory from {base:.2f} to {peak:.2f} GiB at most "
                f"(+{peak - base:.2f}; raytrain plan reckons +{plan:.2f}){gpu}")

    def _build_schedule(self, stage_ids: list[int]) -> None:
        parallel, layout = self.config.parallel, self.layout
        n_stages = layout.pp * parallel.pp_virtual_stages
        self.last_stage = layout.pp == 1 or n_stages - 1 in stage_ids
        self.schedule = None
        if layout.pp > 1:
            wrapped = [(index, CallWithCausal(module, self.objective.causal))
                       for index, module in zip(stage_ids, self.modules, strict=True)]
            self.schedule = build_schedule(parallel.pp_schedule, wrapped, n_stages, self.device, layout.pp_group,
                                           self.train.micro_batches, self._pipeline_loss)
        self.loss_scale = 1.0

    def _restore(self) -> int:
        """Resume from the run folder's latest complete checkpoint (rank 0 picks it for all), else start fresh.
        A LoRA run's checkpoints hold what trains: its frozen base is loaded first, as a new run loads it."""
        folder = self.broadcast(latest_checkpoint(self.run_dir) if self.rank == 0 else None)
        if folder is None or self.train.lora.rank:
            self.stage.start_fresh(self)
        if folder is None:
            return 0
        with storage.local_copy(folder) as local:
            meta, state = load_training_checkpoint(local, self.modules, self.optimizers, self.source.state())
        self.source.load_state(state)
        self._note_debug_resume(meta["step"])
        return meta["step"]

    def load_init_weights(self) -> None:
        """train.init_from's weights into every part, if a run starts from a model."""
        if self.train.init_from:
            for module in self.modules:
                load_weights(self.train.init_from, module)

    def broadcast(self, value):
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

    # -- the loop ---------------------------------------------------------------------------------------

    def run(self) -> None:
        source, train = self.source, self.train
        per_round = source.steps_per_round
        first, rounds = self.start_step // per_round, source.rounds
        batches = source.batches(self.start_step)
        interval, timer = None, _new_timer()
        started = time.perf_counter()
        metrics: dict[str, float] = {}
        if first == 0 and source.has_val and train.val_every > 0:
            self._log(0, source.validate(0))
        done = first * per_round
        for round_ in range(first, rounds):
            if source.stop_reason:  # resumed after a stop that still holds (ppo.stop_on)
                log.warning(f"{self.tag} stopped at step {done}: {source.stop_reason}")
                break
            round_sums = None
            for _ in range(per_round):
                tick = time.perf_counter()
                step, batch = next(batches)  # a stream's read, or PPO's rollout at a round's first step
                timer["data"] += time.perf_counter() - tick
                self._debug_hooks(step)
                sums = self.run_step(step, batch)
                interval = sums if interval is None else interval + sums
                round_sums = sums if round_sums is None else round_sums + sums
                timer["compute"] += time.perf_counter() - tick
                timer["steps"] += 1
            done, done_rounds = (round_ + 1) * per_round, round_ + 1
            extra = source.round_metrics(round_, lambda sums=round_sums: self.objective.metrics(
                self.dp_sum(sums)[:-1], "train"))
            last = done_rounds == rounds or bool(source.stop_reason)
            if done_rounds % train.log_every == 0 or last:
                metrics = {**self._interval_metrics(done - 1, interval, timer), **extra}
                source.on_log(done)
                if source.has_val and (last or (train.val_every and done_rounds % train.val_every == 0)):
                    metrics.update(source.validate(done))
                self._log(done, metrics, started)
                interval, timer = None, _new_timer()
            if done_rounds % train.checkpoint_every == 0 or last or source.stop_reason:
                self._checkpoint(done, metrics)
            if source.stop_reason:
                log.warning(f"{self.tag} stopped after step {done}: {source.stop_reason}")
                break
        source.finish(done)
        if self.log is not None:
            self.log.close()

    def run_step(self, step: int, rows) -> torch.Tensor:
        """One step as the loop takes it (the GPU check, bench/gpu_check.py, times this): the optimizer step, with
        tensor memory counted when debug.track_memory asks, then waiting for the GPU so that a clock around the
        call measures the step. Returns the step's [loss sum, target count, positions]."""
        with self._tracked_memory():
            sums = self._train_step(step, rows)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return sums

    def _tracked_memory(self):
        if self.memory is None:
            return contextlib.nullcontext()
        self.memory.track(training_tensors(self.parts, self.optimizers))
        return self.memory

    def _train_step(self, step: int, rows) -> torch.Tensor:
        """One optimizer step; returns [loss sum, target count, positions] where this rank computed the loss."""
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, self.train)
        first_row = self.layout.dp_rank * self.source.local_batch
        if self.schedule is not None:
            sums = self._pipeline_step(step, rows, first_row)
        else:
            sums = self._accumulate_step(step, rows, first_row)
        if self.nothing_counted:  # no gradient: AdamW's momentum and decay must not move the weights either
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
            self.grad_norm = 0.0
            return sums
        max_norm = self.train.grad_clip if self.train.grad_clip > 0 else float("inf")
        params = [p for part in self.parts for p in part.parameters()]
        self.grad_norm = clip_grad_norm(params, max_norm, self.layout.pp_group)
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return sums

    def _global_count(self, targets: list) -> torch.Tensor:
        """What the loss is a sum over (target tokens, or ranked pairs) in the whole global batch (every pp
        and tp rank holds the same targets)."""
        counts = torch.stack([self.objective.count(t) for t in targets]).sum().double()
        count = all_reduce_sum(counts) / (self.layout.tp * self.layout.pp)
        # A batch can count nothing (DAPO drops every row of prompts whose samples all scored the same): then the
        # step is skipped (every rank sees the same count).
        self.nothing_counted = bool(count == 0)
        return count.clamp(min=1)

    def _accumulate_step(self, step: int, rows, first_row: int) -> torch.Tensor:
        (module,) = self.modules
        micro = rows.chunk(self.train.micro_batches)
        pairs = [with_reference(self.objective, self.reference, *self.objective(m, step, first_row + i * len(micro[0])),
                                self.compute) for i, m in enumerate(micro)]
        pairs = with_reference_point(self.objective, module, self.reference, pairs, self.compute, self.dp_sum)
        global_count = self._global_count([t for _, t in pairs])
        sums = 0
        for i, (inputs, targets) in enumerate(pairs):
            with gradient_sync(module, i == len(pairs) - 1), loss_context(self.split_loss):
                with self.autocast():
                    loss, counted = self.objective.loss(model_call(module, inputs, self.objective.causal), targets)
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

    def pipeline_eval(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
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
            **self.init_memory,
            **tensor_peak_gib(self.device, self.memory),
        }

    @contextlib.contextmanager
    def eval_mode(self):
        for module in self.modules:
            module.eval()
        try:
            yield
        finally:
            for module in self.modules:
                module.train()

    def _log(self, step: int, metrics: dict[str, float], started: float | None = None) -> None:
        if self.log is None:
            return
        self.log.log(step, metrics)
        if "train/loss" in metrics:
            elapsed = time.perf_counter() - started
            total = self.source.rounds * self.source.steps_per_round
            log.info(f"{self.tag} " + progress_line(step, total, metrics, elapsed, step - self.start_step))
        else:
            log.info(f"{self.tag} step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    # -- checkpoints ------------------------------------------------------------------------------------

    def _checkpoint_meta(self, step: int) -> dict:
        """The one raytrain.json writer: what every checkpoint says of itself, then what its stage adds."""
        return {
            "step": step,
            "model": vars(self.config.model),
            "stage": self.stage.name,
            "objective": self.train.objective,
            "head": self.stage.head,
            "weights_prefix": self.stage.weights_prefix,
            "tokens_seen": step * self.tokens_per_step,
            "seed": self.train.seed,
            "world_size": self.world,
            **({"lora": {**vars(self.train.lora), "base": self.stage.lora_base(self)}} if self.train.lora.rank else {}),
            **self.source.checkpoint_meta(),
            **self.stage.checkpoint_meta(self),
        }

    def _checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        meta = self._checkpoint_meta(step)
        with tempfile.TemporaryDirectory(prefix="raytrain-ckpt-") as folder:
            save_training_checkpoint(Path(folder), self.modules, self.optimizers, self.source.state(), meta,
                                     self.rank == 0)
            self.context.publish(Path(folder), step, metrics)

    def _note_debug_resume(self, step: int) -> None:
        """After debug.fail_at_step's exit, the marker records the step the run resumed from (tests read it)."""
        marker = storage.join(self.run_dir, FAILED_ONCE_MARKER)
        if self.rank == 0 and self.config.debug.fail_at_step >= 0 and storage.exists(marker):
            storage.write_text(marker, f"resumed from step {step}\n")

    def _debug_hooks(self, step: int) -> None:
        """debug.step_sleep_s, then debug.fail_at_step."""
        debug = self.config.debug
        time.sleep(debug.step_sleep_s)
        marker = storage.join(self.run_dir, FAILED_ONCE_MARKER)
        if step == debug.fail_at_step and self.rank == debug.fail_rank and not storage.exists(marker):
            storage.write_text(marker, "")
            log.info(f"[raytrain] debug.fail_at_step: worker {self.rank} exits at step {step}")
            os._exit(1)


def _new_timer() -> dict:
    return {"compute": 0.0, "data": 0.0, "steps": 0}
