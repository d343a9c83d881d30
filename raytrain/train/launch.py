"""`raytrain pretrain`: check everything, then run the shared loop on Ray Train workers."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raytrain import storage
from raytrain.config import Config
from raytrain.data.manifest import PreparedDataset
from raytrain.data.tokenizer import tokenizer_hash
from raytrain.errors import ConfigError, DataError
from raytrain.parallel.pipeline import pipeline_errors
from raytrain.parallel.tensor_parallel import tp_errors
from raytrain.runtime import init_ray
from raytrain.train.checkpoint import CHECKPOINTS_DIR, read_checkpoint_meta, resolve_checkpoint
from raytrain.train.loop import train_worker
from raytrain.train.metrics import METRICS_FILE

log = logging.getLogger("raytrain")
CONTROLLER_FAILURE_LIMIT = 3
# Which prepared data each objective trains on, and the command that makes it.
DATA_KIND = {"causal": "pretrain", "masked": "pretrain", "sft": "sft", "reward": "prefs", "dpo": "prefs"}
DATA_COMMAND = {"pretrain": "raytrain data prepare", "sft": "raytrain data sft", "prefs": "raytrain data prefs"}


def check_training_config(config: Config) -> PreparedDataset:
    """Everything that can be checked before a worker starts."""
    train, model = config.train, config.model
    if not train.data:
        raise ConfigError("config key 'train.data' is empty; set it to a folder from `raytrain data prepare`")
    # Workers run in other folders: hand them absolute paths.
    train.data = storage.absolute(train.data)
    if train.init_from:
        train.init_from = storage.absolute(resolve_checkpoint(train.init_from))
    dataset = PreparedDataset.open(train.data)
    wanted = DATA_KIND[train.objective]
    if dataset.kind != wanted:
        raise DataError(f"'{train.data}' holds {dataset.kind} data (from `{DATA_COMMAND[dataset.kind]}`); "
                        f"`raytrain {train.stage}` reads `{DATA_COMMAND[wanted]}` output")
    vocab = dataset.manifest["tokenizer"]["vocab_size"]
    if model.vocab_size < vocab:
        raise ConfigError(f"config key 'model.vocab_size' is {model.vocab_size} but the data's tokenizer has "
                          f"{vocab} tokens; set model.vocab_size={vocab}")
    if train.tokenizer and tokenizer_hash(train.tokenizer) != dataset.tokenizer_sha256:
        raise DataError(f"'{train.data}' was prepared with another tokenizer than '{train.tokenizer}' "
                        f"({dataset.manifest['tokenizer']['path']}); prepare the data again or fix train.tokenizer")
    if dataset.seq_len > model.max_seq_len:
        raise ConfigError(f"config key 'model.max_seq_len' is {model.max_seq_len} but the data's rows hold "
                          f"{dataset.seq_len} tokens; set model.max_seq_len >= {dataset.seq_len} or prepare "
                          "shorter rows")
    check_layout(config, dataset.seq_len)
    if dataset.split("train").num_rows == 0:
        raise DataError(f"'{train.data}' has no train rows")
    if train.init_from:
        meta = read_checkpoint_meta(train.init_from)
        if meta["model"] != vars(model):
            raise ConfigError(f"train.init_from '{train.init_from}' holds model {meta['model']}, "
                              f"which differs from the config's model section")
    return dataset


def check_layout(config: Config, seq_len: int) -> None:
    """The parallel layout fits the model, the batch and the sequence length (also used by `raytrain plan`)."""
    train, model, parallel = config.train, config.model, config.parallel
    per_step = parallel.dp * train.micro_batches
    if train.global_batch % per_step:
        raise ConfigError(f"config key 'train.global_batch' {train.global_batch} is not divisible by "
                          f"data-parallel degree {parallel.dp} × train.micro_batches {train.micro_batches} = "
                          f"{per_step}; make it a multiple of {per_step}")
    problems = tp_errors(model, parallel.tp, seq_len, parallel.sequence_parallel)
    problems += pipeline_errors(model, parallel.pp, parallel.pp_virtual_stages, parallel.pp_layers)
    if parallel.pp > 1 and train.objective in ("reward", "dpo", "ppo", "grpo"):
        problems.append(f"`raytrain {train.stage}` cannot run under parallel.pp={parallel.pp}: it "
                        "compares whole responses (a score, or a log-probability, per response), which a "
                        "pipeline's last stage cannot gather from the micro-batches it is handed; set "
                        "parallel.pp=1 (use tp or dp_shard for a model that does not fit)")
    if parallel.pp > 1 and parallel.pp_schedule != "gpipe" and train.micro_batches % parallel.pp:
        problems.append(f"train.micro_batches={train.micro_batches} must be a multiple of parallel.pp={parallel.pp} "
                        f"for the {parallel.pp_schedule} schedule")
    if problems:
        raise ConfigError("; ".join(problems))


def check_placement(config: Config, use_gpu: bool, beside: str = "", beside_cpus: float = 0.0) -> None:
    """The workers fit the cluster, beside what else the run places (`beside`: PPO's actor pools); on an
    autoscaling cluster after waiting up to runtime.resource_wait_s for the nodes."""
    parallel = config.parallel
    worker = {"CPU": parallel.cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    bundles = [worker] * parallel.workers + ([{"CPU": beside_cpus}] if beside_cpus else [])
    need = {"CPU": parallel.workers * parallel.cpus_per_worker + beside_cpus,
            "GPU": float(parallel.workers) if use_gpu else 0.0}
    wait_s = config.runtime.resource_wait_s
    have = await_resources(need, bundles, wait_s)
    waited = f" after waiting {wait_s:g}s for the autoscaler" if wait_s else ""
    hint = "" if wait_s else ", or on an autoscaling cluster wait for the nodes with runtime.resource_wait_s=900"
    if need["CPU"] > have.get("CPU", 0):
        raise ConfigError(f"parallel.workers={parallel.workers} × parallel.cpus_per_worker="
                          f"{parallel.cpus_per_worker}{beside} need {need['CPU']:g} CPUs but the cluster has "
                          f"{have.get('CPU', 0):g}{waited}; lower parallel.workers or parallel.cpus_per_worker{hint}")
    if need["GPU"] > have.get("GPU", 0):
        raise ConfigError(f"parallel.workers={parallel.workers} need {parallel.workers} GPUs but the cluster has "
                          f"{have.get('GPU', 0):g}{waited}; lower parallel.workers{hint}")


def await_resources(need: dict[str, float], bundles: list[dict[str, float]], wait_s: float) -> dict[str, float]:
    """The cluster's resources, once they cover `need` or wait_s has passed. While it waits, the bundles are asked
    of the autoscaler (which starts nodes for them; the request is withdrawn after)."""
    have = ray.cluster_resources()
    if wait_s <= 0 or _covers(have, need):
        return have
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)
    started, next_note = time.monotonic(), 0.0
    try:
        while not _covers(have, need) and (waited := time.monotonic() - started) < wait_s:
            if waited >= next_note:
                log.info("waiting for %s (the cluster has %s): %.0fs of runtime.resource_wait_s=%g", _amounts(need),
                         _amounts(have), waited, wait_s)
                next_note += 30.0
            time.sleep(1.0)
            have = ray.cluster_resources()
    finally:
        request_resources(bundles=[])
    return have


def _covers(have: dict[str, float], need: dict[str, float]) -> bool:
    return all(have.get(kind, 0.0) >= amount for kind, amount in need.items())


def _amounts(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(kind, 0.0):g} {kind}" for kind in ("CPU", "GPU"))


def run_sft(config: Config, callbacks: tuple = ()) -> dict:
    """`raytrain sft`: the same loop on chat rows, loss on the answer tokens, from a pre-trained checkpoint."""
    return _run_from_model(config, "sft", "fine-tuning", "a pre-training run", callbacks)


def run_reward(config: Config, callbacks: tuple = ()) -> dict:
    """`raytrain reward`: the same loop on ranked responses, a score head and the Bradley–Terry loss, from an
    SFT (or pre-trained) checkpoint."""
    return _run_from_model(config, "reward", "a reward model", "an SFT run", callbacks)


def run_dpo(config: Config, callbacks: tuple = ()) -> dict:
    """`raytrain dpo`: the policy from an SFT checkpoint against a frozen copy of it, on preference rows."""
    # Each response's log-probability needs whole logits: under tp they are gathered, not left vocabulary-split.
    config.parallel.loss_parallel = False
    return _run_from_model(config, "dpo", "DPO", "an SFT run", callbacks)


def _run_from_model(config: Config, objective: str, what: str, typical: str, callbacks: tuple) -> dict:
    config.train.objective = objective
    if not config.train.init_from:
        raise ConfigError(f"{what} starts from a model: pass --init runs/NAME ({typical}) or a checkpoint folder "
                          "(train.init_from)")
    return run_pretrain(config, callbacks)


def run_pretrain(config: Config, callbacks: tuple = ()) -> dict:
    """`raytrain pretrain`; `callbacks` are Ray Train's (a sweep's trial reports through one)."""
    dataset = check_training_config(config)
    init_ray(config.runtime)
    check_placement(config, use_gpus(config))
    return fit(config, train_worker, f"{config.train.steps} steps of {config.train.global_batch} sequences × "
                                     f"{dataset.seq_len} tokens", callbacks)


def use_gpus(config: Config) -> bool:
    if config.parallel.use_gpu is not None:
        return config.parallel.use_gpu
    return ray.cluster_resources().get("GPU", 0) >= config.parallel.workers


def fit(config: Config, train_fn, work: str, callbacks: tuple = (), **loop_config) -> dict:
    """Run `train_fn` on the Ray Train workers of config.parallel into the run folder; write summary.json."""
    run_dir = config.run.location  # a path or a URI: Ray Train writes checkpoints to either
    config.save(storage.join(run_dir, "config.yaml"))
    parallel = config.parallel
    log.info("%s: %d worker(s) (pp %d × dp_replicate %d × dp_shard %d × tp %d), %s → %s",
             config.train.stage, parallel.workers, parallel.pp, parallel.dp_replicate, parallel.shard,
             parallel.tp, work, run_dir)
    use_gpu = use_gpus(config)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"config": config.to_dict(), "run_dir": run_dir, **loop_config},
        scaling_config=ScalingConfig(num_workers=config.parallel.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.parallel.cpus_per_worker},
                                     placement_strategy=config.parallel.placement_strategy),
        run_config=RunConfig(
            name=CHECKPOINTS_DIR,
            storage_path=run_dir,
            # A controller that cannot start its workers (their resources taken) gives up instead of retrying
            # forever: a sweep's trial then fails rather than hangs.
            failure_config=FailureConfig(max_failures=config.train.max_failures,
                                         controller_failure_limit=CONTROLLER_FAILURE_LIMIT),
            callbacks=list(callbacks),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            # Ray Train's own lines (worker group started, every report and checkpoint) at runtime.log_level.
            logging_config=LoggingConfig(log_level=config.runtime.log_level.upper()),
        ),
    )
    started = time.perf_counter()
    result = trainer.fit()
    # The checkpoint's place named as the run folder is (Ray's own path drops a URI's scheme).
    checkpoint = storage.join(run_dir, CHECKPOINTS_DIR, result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1]) \
        if result.checkpoint else None
    return write_summary(run_dir, checkpoint, time.perf_counter() - started)


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
