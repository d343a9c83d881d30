"""`raytrain tune`: any stage as a Ray Tune sweep. Each trial is that stage's whole run (a TorchTrainer with its
own workers, any layout) in runs/SWEEP/trial_NNN/; ASHA stops trials early at their report points.

The trial itself is a Tune function trainable that asks for almost nothing: its TorchTrainer reports to Tune
through TuneReportCallback, and how many trials run at once follows the cluster's free CPUs and GPUs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import posixpath
import time
from pathlib import Path

import ray

from raytrain import storage
from raytrain.config import Config, config_from_dict
from raytrain.errors import ConfigError
from raytrain.runtime import environ, init_ray
from raytrain.stages import STAGES, get_stage
from raytrain.train.metrics import METRICS_FILE
from raytrain.tune.record import SWEEP_FILE, Sweep, read_sweep, write_sweep
from raytrain.tune.results import trial_rows, write_results
from raytrain.tune.space import Dimension, space_to_yaml_tree, to_tune

log = logging.getLogger("raytrain")
TRIAL_DRIVER_CPUS = 0.01  # the Tune trial only waits on its TorchTrainer's controller
PLACEMENT_GROUP_WAIT_S = 30.0
TUNE_FOLDER = "tune"  # Tune's own experiment state, inside the sweep folder


def check_sweep(config: Config, sweep: Sweep, space: list[Dimension]) -> Config:
    """Before any trial: the stage accepts the base config and every value the space can draw, and the metric is
    in every report of a trial. Returns the base config the trials start from (paths made absolute: trials run
    in their own working folders)."""
    stage = get_stage(sweep.stage)
    if sweep.metric not in stage.metrics:
        raise ConfigError(f"--metric {sweep.metric} is not a metric `raytrain {sweep.stage}` logs; choose one of "
                          f"{', '.join(m for m in stage.metrics if m != 'train/tokens_seen')}")
    train = config.train
    if train.checkpoint_every % train.log_every:
        raise ConfigError(f"a sweep reports at each checkpoint: train.checkpoint_every={train.checkpoint_every} must "
                          f"be a multiple of train.log_every={train.log_every}")
    if sweep.metric.startswith("val/") and (not train.val_every or train.checkpoint_every % train.val_every):
        raise ConfigError(f"{sweep.metric} must be in every report (one per checkpoint): make "
                          f"train.checkpoint_every={train.checkpoint_every} a multiple of train.val_every="
                          f"{train.val_every}")
    stage.preflight(config)
    for dim in space:  # each value the space can draw, with the base config's other keys
        for value in dim.values:
            try:
                stage.preflight(config.with_values({dim.key: value}))
            except ConfigError as exc:
                raise ConfigError(f"search space key '{dim.key}': the value {value!r} cannot run: {exc}") from None
    absolute = {}
    for section, key in (("train", "data"), ("train", "init_from"), ("train", "tokenizer"), ("ppo", "policy"),
                         ("ppo", "reward"), ("ppo", "prompts")):
        value = getattr(getattr(config, section), key)
        if value and Path(value).exists():
            absolute[f"{section}.{key}"] = str(Path(value).absolute())
    return config.with_values(absolute)


def reports(config: Config, stage: str) -> int:
    """How many times a trial reports (ASHA's time axis): one per checkpoint, and one at the end."""
    return math.ceil(get_stage(stage).rounds(config) / config.train.checkpoint_every)


def trial_resources(config: Config, stage: str) -> dict[str, float]:
    from raytrain.cluster.resources import use_gpus

    parallel, actors = config.parallel, get_stage(stage).actor_resources(config)
    cpus = parallel.workers * parallel.cpus_per_worker + TRIAL_DRIVER_CPUS
    gpus = float(parallel.workers) if use_gpus(config) else 0.0  # as the trial's TorchTrainer will decide
    return {"CPU": cpus + actors["CPU"], "GPU": gpus + actors["GPU"]}


def concurrency(config: Config, stage: str, space: list[Dimension], limit: int | None) -> int:
    """Trials that fit the cluster's free resources at once (the largest trial the space allows decides)."""
    needs = [trial_resources(config, stage)]
    for dim in space:
        for value in dim.values:
            needs.append(trial_resources(config.with_values({dim.key: value}), stage))
    free = ray.available_resources()
    most = {kind: max(need[kind] for need in needs) for kind in ("CPU", "GPU")}
    fits = {kind: int(free.get(kind, 0.0) // most[kind]) for kind in most if most[kind] > 0}
    for kind, count in fits.items():
        if count < 1:
            raise ConfigError(f"one trial needs {most[kind]:g} {kind}s but the cluster has {free.get(kind, 0.0):g} "
                              "free; lower parallel.workers, parallel.cpus_per_worker or the actors' share")
    return min(min(fits.values()), limit) if limit else min(fits.values())


def run_trial(params: dict, *, stage: str, base: dict, sweep_dir: str) -> None:
    """One trial (in a Tune trial actor): the stage's run with the sampled values, reporting to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    config = config_from_dict(base).with_values({**params, "run.root": sweep_dir,
                                                 "run.name": tune.get_context().get_trial_name(),
                                                 "tracking.group": posixpath.basename(sweep_dir)})
    get_stage(stage).run(config, callbacks=(TuneReportCallback(),))


def trial_name(trial) -> str:
    return f"trial_{int(trial.trial_id.rsplit('_', 1)[-1]):03d}"


def run_sweep(config: Config, sweep: Sweep, space: list[Dimension], max_concurrent: int | None = None) -> dict:
    """Run (or resume) the sweep; write trials.csv and best.yaml; return the best trial's row."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    config = check_sweep(config, sweep, space)
    sweep_dir = storage.join(storage.absolute(config.run.root), sweep.name)  # a folder or a URI
    _claim_sweep_dir(sweep_dir, sweep)
    init_ray(config.runtime)
    trials_at_once = concurrency(config, sweep.stage, space, max_concurrent)
    most_reports = max([reports(config, sweep.stage)] + [reports(config.with_values({d.key: v}), sweep.stage)
                                                         for d in space for v in d.values])
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=most_reports, grace_period=1,
                               reduction_factor=2) if sweep.scheduler == "asha" else FIFOScheduler())
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, stage=sweep.stage, base=config.to_dict(), sweep_dir=sweep_dir),
        {"CPU": TRIAL_DRIVER_CPUS})
    experiment = storage.join(sweep_dir, TUNE_FOLDER)
    log.info("tune: %s sweep '%s' of `raytrain %s` over %s, %d sample(s), %d trial(s) at once, %s on %s → %s",
             sweep.scheduler, sweep.name, sweep.stage, ", ".join(sweep.space), sweep.samples, trials_at_once,
             sweep.mode, sweep.metric, sweep_dir)
    groups_before = _live_placement_groups()
    started = time.perf_counter()
    if tune.Tuner.can_restore(experiment):
        log.info("tune: resuming '%s'; finished trials are kept", sweep.name)
        tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune(space),
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, num_samples=sweep.samples, scheduler=scheduler,
                search_alg=BasicVariantGenerator(random_state=sweep.seed, max_concurrent=trials_at_once),
                trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(name=TUNE_FOLDER, storage_path=sweep_dir, verbose=0),
        )
    # Tune's own console tables would bury the trials' progress lines; the table at the end sums them up.
    with environ(RAY_AIR_NEW_OUTPUT=os.environ.get("RAY_AIR_NEW_OUTPUT", "0")):
        grid = tuner.fit()
    wall_s = time.perf_counter() - started
    _wait_for_placement_groups(groups_before)
    _complete_run_folders(grid, sweep_dir)
    stage = get_stage(sweep.stage)
    rows = trial_rows(grid, sweep, sweep_dir, lambda params: stage.total_steps(config.with_values(params)))
    return {**write_results(sweep_dir, sweep, rows, wall_s), "trials_at_once": trials_at_once}


def _complete_run_folders(grid, sweep_dir: str) -> None:
    """A trial that Tune stops at a report (ASHA, also at its last one) dies before its stage writes
    summary.json: write it from the trial's metrics.jsonl, its last reported checkpoint and its time."""
    from raytrain.train.metrics import write_summary

    for result in grid:
        run_dir = storage.join(sweep_dir, posixpath.basename(result.path))
        if storage.is_file(storage.join(run_dir, METRICS_FILE)) and not storage.is_file(
                storage.join(run_dir, "summary.json")):
            metrics = result.metrics or {}
            write_summary(run_dir, metrics.get("checkpoint_path"), metrics.get("time_total_s", 0.0))


def _claim_sweep_dir(sweep_dir: str, sweep: Sweep) -> None:
    """A new sweep records what it is; a rerun must ask for the same sweep (then it resumes)."""
    if not storage.is_file(storage.join(sweep_dir, SWEEP_FILE)):
        write_sweep(sweep_dir, sweep)
        return
    before = dataclasses.asdict(read_sweep(sweep_dir))
    changed = sorted(k for k, v in dataclasses.asdict(sweep).items() if before[k] != v)
    if changed:
        raise ConfigError(f"{sweep_dir} holds sweep '{sweep.name}' with another {', '.join(changed)}; rerun it "
                          "as it was to resume it, or give a new --name")


def _live_placement_groups() -> set[str]:
    return {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}


def _wait_for_placement_groups(before: set[str]) -> None:
    """Trials stopped by ASHA free their workers' placement groups asynchronously; wait for that, and remove
    any the sweep created that outlive it (they would hold CPUs from every later run)."""
    from ray.util.placement_group import PlacementGroup

    deadline = time.monotonic() + PLACEMENT_GROUP_WAIT_S
    while (left := _live_placement_groups() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pg_id in left:
        log.warning("tune: removing placement group %s left by a stopped trial", pg_id)
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))


def new_sweep(name: str, stage: str, metric: str | None, mode: str | None, samples: int, scheduler: str,
              space: list[Dimension], seed: int) -> Sweep:
    if stage not in STAGES:
        raise ConfigError(f"--stage {stage}: choose one of {', '.join(STAGES)}")
    default_metric, default_mode = STAGES[stage].sweep_metric
    if samples < 1:
        raise ConfigError("--samples must be >= 1")
    if metric not in (None, default_metric) and mode is None:
        raise ConfigError(f"--metric {metric}: say whether lower or higher is better with --mode min or --mode max")
    return Sweep(name=name, stage=stage, metric=metric or default_metric, mode=mode or default_mode, samples=samples,
                 scheduler=scheduler, space=space_to_yaml_tree(space), seed=seed)


def tune_command(args) -> None:
    """`raytrain tune ...` (cli.py parses; this builds the base config, the space and the sweep, and runs it)."""
    from raytrain.config import load_config
    from raytrain.tune.space import load_space

    overrides = [f"run.name={args.name}", *([f"runtime.address={args.address}"] if args.address else []),
                 *args.overrides]
    config = load_config(args.config, overrides)
    space = load_space(args.space, config)
    sweep = new_sweep(args.name, args.stage, args.metric, args.mode, args.samples, args.scheduler, space,
                      config.train.seed)
    run_sweep(config, sweep, space, args.max_concurrent)
