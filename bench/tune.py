"""Sweeps, each measured side by side with its baseline in one run.

(a) an 8-trial ASHA sweep of `train.lr` (`raytrain tune`) against the same 8 learning rates run to the end one
    after another with `raytrain pretrain` (goal ≤ 0.5×);
(b) the sweep's overhead per trial: a 1-trial sweep without a scheduler against the same run on its own.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from raytrain.config import load_config
from raytrain.data.sources import stdlib_files
from raytrain.tune.space import load_space
from raytrain.tune.sweep import new_sweep, run_sweep

TRIALS = 8
STEPS = 480
REPORTS = 4  # checkpoints per trial: ASHA's rungs
D_MODEL, BATCH = 64, 32
PER_CORE = 2  # trials at once in (a): this machine's cores


def run() -> str:
    from raytrain.data.prepare import run_prepare_stage
    from raytrain.data.tokenizer_stage import run_tokenizer_stage
    from raytrain.stages import STAGES

    work = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    try:
        corpus = work / "corpus"
        corpus.mkdir()
        for i, path in enumerate(stdlib_files()[:60]):
            shutil.copy(path, corpus / f"module_{i:02d}.txt")
        config = load_config("tiny", [f"run.root='{work}'", f"data.source.inputs=['{corpus}']",
                                      f"data.tokenizer.out='{work}/tok'", f"data.prepare.tokenizer='{work}/tok'",
                                      f"data.prepare.out='{work}/data'", f"train.data='{work}/data'",
                                      f"train.steps={STEPS}", f"train.log_every={STEPS // REPORTS}",
                                      f"train.val_every={STEPS // REPORTS}",
                                      f"train.checkpoint_every={STEPS // REPORTS}", "tracking.mode=disabled",
                                      # Enough compute per step that a trial is training more than starting up.
                                      f"model.d_model={D_MODEL}", f"train.global_batch={BATCH}"])
        run_tokenizer_stage(config)
        run_prepare_stage(config)
        space_file = work / "space.yaml"
        space_file.write_text("train.lr: {loguniform: [1e-5, 3e-2]}\n")
        space = load_space(space_file, config)

        swept = {}  # trials at once → the sweep's result; both sweeps draw the same learning rates (seed 0)
        for at_once in PER_CORE, None:
            sweep = new_sweep(f"asha-{at_once or 'default'}", "pretrain", None, None, TRIALS, "asha", space, seed=0)
            swept[at_once] = run_sweep(config, sweep, space, max_concurrent=at_once)
        started = time.perf_counter()
        for row in swept[PER_CORE]["rows"]:  # the same learning rates, each to the end, one after another
            STAGES["pretrain"].run(config.with_values({"run.name": f"seq-{row['trial']}",
                                                       "train.lr": float(row["train.lr"])}))
        sequential_s = time.perf_counter() - started

        single = new_sweep("single", "pretrain", None, None, 1, "none", [], seed=0)
        one_trial = run_sweep(config, single, [])["wall_s"]
        started = time.perf_counter()
        STAGES["pretrain"].run(config.with_values({"run.name": "alone"}))
        alone_s = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for at_once, label in (PER_CORE, "(a)"), (None, "(a')"):
        result = swept[at_once]
        stopped = sum(row["status"] == "stopped early" for row in result["rows"])
        steps = sum(int(row["steps"]) for row in result["rows"]) / (TRIALS * STEPS)
        how = (f"{at_once} trials at once, one per core" if at_once else
               f"as many at once as the free CPUs fit ({result['trials_at_once']})")
        rows.append(f"| {label} {TRIALS}-trial ASHA sweep of train.lr, {how}, vs the same {TRIALS} runs to the end "
                    f"one after another ({stopped} stopped early: {steps:.0%} of the steps) | "
                    f"{result['wall_s']:.0f} s | {sequential_s:.0f} s | "
                    f"**{result['wall_s'] / sequential_s:.2f}×** | ≤ 0.5× |")
    return "\n".join([
        "## Sweeps (bench/tune.py)",
        "",
        f"The tiny preset with d_model {D_MODEL}, batch {BATCH} × 32 tokens, {STEPS} steps per trial (one worker, one "
        f"thread), {REPORTS} reports (ASHA's rungs), on a local Ray with 4 logical CPUs on this machine's cores.",
        "",
        "| measure | sweep | baseline | ratio | goal |",
        "|---|---|---|---|---|",
        *rows,
        f"| (b) a 1-trial sweep vs the same run alone: overhead per trial | {one_trial:.1f} s | {alone_s:.1f} s | "
        f"{one_trial / alone_s:.2f}× (+{one_trial - alone_s:.1f} s) | — |",
        "",
        "A sweep gains twice over a sequential search: ASHA stops trials early (the share of steps run), and trials "
        "run side by side. On two cores the second gain is small: each trial's worker trains on one thread, and two "
        "or three of them, with their Ray processes, share the two cores, so a trial trains well below its speed "
        "alone (compare the trials' perf/tokens_per_s). Asynchronous ASHA also lets the first trial to reach a "
        "rung through, so the more trials run at once, the fewer it can compare and stop. On a cluster, where each "
        "trial has its own cores or GPUs, the wall time falls with the number of trials at once.",
    ])
