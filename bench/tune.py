"""An ASHA sweep of `train.lr` (`raytrain tune`) against the same learning rates run to the end one after another
with `raytrain pretrain` (goal ≤ 0.5×), REPEATS times interleaved (sweep, sequential, sweep, sequential, ...).

Both sides are timed the same way, from outside the call: the sweep's whole `run_sweep` (its checks, Tune, the
wait for stopped trials' placement groups, its results files), the sequential side's whole loop of stage runs
(each run's checks and Ray Train fit). Neither includes starting Ray or preparing the data. Both use the machine's
two cores: the sweep runs two one-thread trials at once, the sequential runs one two-thread run at a time.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import SPREAD_NOTE, Spread, interleaved, pick, ratio_cell, settings
from raytrain.config import load_config
from raytrain.data.sources import stdlib_files
from raytrain.tune.space import load_space
from raytrain.tune.sweep import new_sweep, run_sweep

RAY_CPUS = 4
TRIALS = pick(3, 1)  # 4 would take the section to ~6.5 min here: each run starts for ~19 s whatever its length
STEPS = pick(24, 4)
REPORTS = pick(3, 2)  # checkpoints per trial: ASHA's time axis (grace period 1 report, reduction factor 2)
D_MODEL, BATCH = pick(64, 32), pick(32, 8)
AT_ONCE = 2  # trials at once: one per core of this machine, one thread each
SEQUENTIAL_THREADS = 2  # the sequential runs, one at a time, take both cores


def steps_s(run_dir: Path) -> tuple[float, float]:
    """(seconds in the training loop's steps, the median step's seconds past the first log interval) of a run,
    from its metrics.jsonl: each interval's mean step time (its wait for data included) times its steps."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_times = [r["perf/step_time_s"] for r in records if "perf/step_time_s" in r]
    return sum(step_times) * (STEPS // REPORTS), statistics.median(step_times[1:] or step_times)


def run() -> str:
    from raytrain.data.prepare import run_prepare_stage
    from raytrain.data.tokenizer_stage import run_tokenizer_stage
    from raytrain.stages import STAGES

    work = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    try:
        corpus = work / "corpus"
        corpus.mkdir()
        for i, path in enumerate(stdlib_files()[:pick(30, 10)]):
            shutil.copy(path, corpus / f"module_{i:02d}.txt")
        config = load_config("tiny", [f"run.root='{work}'", f"data.source.inputs=['{corpus}']",
                                      f"data.tokenizer.out='{work}/tok'", f"data.prepare.tokenizer='{work}/tok'",
                                      f"data.prepare.out='{work}/data'", f"train.data='{work}/data'",
                                      f"train.steps={STEPS}", f"train.log_every={STEPS // REPORTS}",
                                      f"train.val_every={STEPS // REPORTS}",
                                      f"train.checkpoint_every={STEPS // REPORTS}", "tracking.mode=disabled",
                                      # The tiny preset, a little wider (with so few steps, start-up dominates).
                                      f"model.d_model={D_MODEL}", f"train.global_batch={BATCH}",
                                      "parallel.cpus_per_worker=1",
                                      # No 1-second matmul at each run's start to measure a peak for MFU.
                                      "train.peak_tflops=1"])
        run_tokenizer_stage(config)
        run_prepare_stage(config)
        space_file = work / "space.yaml"
        space_file.write_text("train.lr: {loguniform: [1e-5, 3e-2]}\n")
        space = load_space(space_file, config)

        drawn: list[list[float]] = []  # each repeat's learning rates, as its sweep drew them (seed 0: the same)
        results: list[dict] = []

        def sweep() -> dict[str, float]:
            name = f"asha-{len(results)}"
            started = time.perf_counter()
            result = run_sweep(config, new_sweep(name, "pretrain", None, None, TRIALS, "asha", space, seed=0), space,
                               max_concurrent=AT_ONCE)
            wall_s = time.perf_counter() - started
            results.append(result)
            drawn.append([float(row["train.lr"]) for row in result["rows"]])
            trial_steps = [steps_s(Path(row["run_dir"]))[1] for row in result["rows"]]
            return {"s": wall_s, "fit_s": result["wall_s"], "step_s": statistics.median(trial_steps),
                    "stopped": sum(row["status"] == "stopped early" for row in result["rows"]),
                    "steps": sum(int(row["steps"] or 0) for row in result["rows"]) / (TRIALS * STEPS)}

        def sequential() -> dict[str, float]:
            repeat = len(drawn) - 1  # the learning rates the sweep just before drew, each to the end
            started, runs = time.perf_counter(), []
            for i, lr in enumerate(drawn[repeat]):
                tick = time.perf_counter()
                STAGES["pretrain"].run(config.with_values({"run.name": f"seq-{repeat}-{i}", "train.lr": lr,
                                                           "parallel.cpus_per_worker": SEQUENTIAL_THREADS}))
                runs.append(time.perf_counter() - tick)
            wall_s = time.perf_counter() - started
            loops = [steps_s(work / f"seq-{repeat}-{i}") for i in range(len(runs))]
            return {"s": wall_s, "run_s": statistics.mean(runs), "train_s": statistics.mean(t for t, _ in loops),
                    "step_s": statistics.median(step for _, step in loops)}

        spreads = interleaved({"sweep": sweep, "sequential": sequential})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours, base = spreads["sweep"], spreads["sequential"]
    same = all(lrs == drawn[0] for lrs in drawn)
    fit_share = Spread([f / s for f, s in zip(ours["fit_s"].values, ours["s"].values, strict=True)])
    at_once = min(AT_ONCE, TRIALS)
    ideal = ours["steps"].median / at_once  # the ratio were runs all training and trials at once independent
    return "\n".join([
        "## Sweeps (bench/tune.py)",
        "",
        f"A {TRIALS}-trial ASHA sweep of `train.lr` (log-uniform 1e-5 to 3e-2, seed 0: "
        f"{'the same rates in every repeat' if same else 'the rates differed between repeats'}) against the same "
        f"{TRIALS} learning rates run to the end one after another with `raytrain pretrain`. The tiny preset with "
        f"d_model {D_MODEL}, batch {BATCH} × {config.data.prepare.seq_len} tokens, {STEPS} steps per trial and "
        f"{REPORTS} reports (a checkpoint and a validation each: ASHA's rungs, grace period 1 report, reduction "
        f"factor 2), on the section's local Ray with {RAY_CPUS} logical CPUs on 2 cores. Both sides are timed "
        "around the whole call (the sweep: checks, Tune, the wait for stopped trials' placement groups, its "
        "results files; the sequential side: each run's checks and fit); neither includes starting Ray or "
        f"preparing the data. {TRIALS} trials of {STEPS} steps keep the section within five minutes: each run, "
        "trial or sequential, spends most of its time starting (below), and each repeat runs every learning "
        "rate twice.",
        "",
        f"- sweep: {settings(trials=TRIALS, at_once=AT_ONCE, workers_per_trial=1, threads_per_worker=1, scheduler='asha', steps=STEPS, reports=REPORTS)}",  # noqa: E501
        f"- sequential: {settings(runs=TRIALS, at_once=1, workers_per_run=1, threads_per_worker=SEQUENTIAL_THREADS, steps=STEPS, reports=REPORTS)}",  # noqa: E501
        "",
        SPREAD_NOTE,
        "",
        "| measure | sweep | sequential | ratio (sweep / sequential) | goal |",
        "|---|---:|---:|---:|---:|",
        f"| (a) wall time of the {TRIALS} learning rates, s | {ours['s'].cell('{:.0f}')} | "
        f"{base['s'].cell('{:.0f}')} | {ratio_cell(ours['s'], base['s'])} | ≤ 0.5× |",
        f"| trials ASHA stopped early | {ours['stopped'].cell('{:.0f}')} of {TRIALS} | — | — | — |",
        f"| share of the sequential side's steps the sweep ran | {ours['steps'].cell('{:.0%}')} | 100% | — | — |",
        "",
        f"The ratio is sweep time over sequential time (< 1: the sweep is faster). Were a run all training and "
        f"the {at_once} trials at once free of each other, the sweep would take {ideal:.2f}× the sequential "
        f"time (the share of steps it ran ÷ {at_once}). What holds it above that, measured: a run alone took "
        f"{base['run_s'].cell('{:.1f}')} s, of which {base['train_s'].cell('{:.1f}')} s were its training "
        "loop's steps (the first of them waiting for Ray Data's stream to start). The rest, Ray Train's "
        "controller and worker starting and stopping (and the validations and checkpoints at the reports), "
        "every trial pays however early ASHA stops it. And past the first report a trial's step took "
        f"{ours['step_s'].cell('{:.3f}')} s in the sweep (two one-thread trials sharing two cores with each "
        f"other's start-up and their Ray processes) against {base['step_s'].cell('{:.3f}')} s in a sequential "
        f"run (two threads). Tune's `fit` (the `wall_s` that `run_sweep` reports) was "
        f"{fit_share.cell('{:.0%}')} of the sweep's time above. On a cluster, where each trial has its own "
        "cores or GPUs and trains far longer than it takes to start, the ratio approaches the share of steps ÷ "
        "trials at once.",
    ])
