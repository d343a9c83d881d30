"""What a training stage is: one object that owns everything about it, so that adding a stage is adding one file.

A stage names its command and W&B job type, the train.objective values it runs, its data, its objective (and
through it the metric names dashboards, reports, sweeps and tests read), its default sweep metric, its panel
family, its layout constraints, its checkpoints' head, and its pre-flight checks, which return a new, frozen,
resolved config (configs are frozen dataclasses: nothing mutates the one a user gave). The loop
(train/loop.py) asks a stage for its batch source and a few hooks; it never names a stage.
"""

from __future__ import annotations

import functools
import logging

from raytrain import storage
from raytrain.config import Config
from raytrain.data.manifest import DATA_COMMANDS, PreparedDataset
from raytrain.data.tokenizer import tokenizer_hash
from raytrain.errors import ConfigError, DataError
from raytrain.model.config import TransformerConfig
from raytrain.parallel.pipeline import pipeline_errors
from raytrain.parallel.tensor_parallel import tp_errors
from raytrain.train.checkpoint import read_checkpoint_meta, resolve_checkpoint
from raytrain.train.metrics import LOOP_METRICS

log = logging.getLogger("raytrain")


class Stage:
    name: str  # the command (`raytrain NAME`), the W&B job type, `raytrain tune --stage NAME`
    order: int  # its place in the chain (pretrain first)
    help: str  # the command's one line
    objectives: tuple[str, ...]  # the train.objective values it runs; the first unless the config names another
    family: str  # its panel family (train/panels.py): dashboards and reports lay its metrics out so
    objective_class: type  # its loss; the metric names come from what it logs
    source_metrics: tuple[str, ...] = ()  # what its batch source logs beside
    sweep_metric: tuple[str, str] = ("val/loss", "min")  # what `raytrain tune --stage NAME` optimises by default
    head = "lm"  # its checkpoints' output layer ("score": a reward model)
    weights_prefix = ""  # where the model's weights sit in its checkpoints (PPO: the policy's, beside a value model)
    pipeline = True  # may run under parallel.pp > 1
    whole_logits = False  # needs whole logits (sequence log-probs): tp's loss_parallel is turned off
    in_process = True  # its loop can run without Ray (train/local.py): no Ray actors beside the workers
    packs = False  # packs its rows under train.packing (train/packing.py)

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric name a run of this stage logs (mem/tensor_peak_gib only where it is measured)."""
        return tuple(dict.fromkeys((*LOOP_METRICS, *self.objective_class.logged(), *self.source_metrics)))

    def objective_of(self, config: Config) -> str:
        """The objective this stage runs: the config's, if it is one of this stage's, else the stage's first."""
        from raytrain.stages import all_objectives

        objective = config.train.objective
        if objective not in all_objectives():
            raise ConfigError(f"config key 'train.objective' is {objective!r}; choose one of "
                              f"{', '.join(all_objectives())}")
        return objective if objective in self.objectives else self.objectives[0]

    def check_layout(self, config: Config, seq_len: int) -> None:
        """The parallel layout fits the model, the batch and the sequence length (also `raytrain plan`'s check)."""
        train, model, parallel = config.train, config.model, config.parallel
        per_step = parallel.dp * train.micro_batches
        if train.global_batch % per_step:
            raise ConfigError(f"config key 'train.global_batch' {train.global_batch} is not divisible by "
                              f"data-parallel degree {parallel.dp} × train.micro_batches {train.micro_batches} = "
                              f"{per_step}; make it a multiple of {per_step}")
        problems = tp_errors(model, parallel.tp, seq_len, parallel.sequence_parallel)
        problems += pipeline_errors(model, parallel.pp, parallel.pp_virtual_stages, parallel.pp_layers)
        if parallel.pp > 1 and not self.pipeline:
            problems.append(f"`raytrain {self.name}` cannot run under parallel.pp={parallel.pp}: it "
                            "compares whole responses (a score, or a log-probability, per response), which a "
                            "pipeline's last stage cannot gather from the micro-batches it is handed; set "
                            "parallel.pp=1 (use tp or dp_shard for a model that does not fit)")
        if train.packing and not self.packs:
            from raytrain.stages import STAGES

            packing = ", ".join(f"`raytrain {s.name}`" for s in STAGES.values() if s.packs)
            problems.append(f"train.packing is for the rows of {packing}; `raytrain {self.name}` pads each example: "
                            "set train.packing=false")
        if train.packing and parallel.pp > 1:
            problems.append("train.packing gives each step a different number of rows, which a pipeline's "
                            "micro-batches cannot take; set parallel.pp=1 (tp and FSDP pack)")
        if parallel.pp > 1 and parallel.pp_schedule != "gpipe" and train.micro_batches % parallel.pp:
            problems.append(f"train.micro_batches={train.micro_batches} must be a multiple of parallel.pp="
                            f"{parallel.pp} for the {parallel.pp_schedule} schedule")
        if problems:
            raise ConfigError("; ".join(problems))

    def preflight(self, config: Config) -> Config:
        """Everything that can be checked before a worker starts; the config the workers run (frozen)."""
        raise NotImplementedError

    def check_lora(self, config: Config, base: str) -> None:
        """train.lora adapts a model that exists (base: the checkpoint it starts from), and its targets and rank
        fit the model's layers (tried on the meta device)."""
        lora = config.train.lora
        if not lora.rank:
            return
        if not base:
            raise ConfigError(f"train.lora.rank={lora.rank} adapts a trained model, but `raytrain {self.name}` "
                              "starts from scratch here; pass --init (train.init_from) or set train.lora.rank=0")
        import torch

        from raytrain.model.lora import apply_lora
        from raytrain.model.transformer import Transformer

        with torch.device("meta"):
            apply_lora(Transformer(config.model, head=self.head), lora)

    def cli_flags(self) -> list[tuple[str, str, dict]]:
        """The command's flags: (flag, config key, argparse options), sugar for `key=value` overrides."""
        raise NotImplementedError

    def run(self, config: Config, callbacks: tuple = ()) -> dict:
        """The stage's whole run on Ray; `callbacks` are Ray Train's (a sweep's trial reports through one)."""
        raise NotImplementedError

    def rounds(self, config: Config) -> int:
        """How many rounds of the loop a run takes (a sweep's time axis counts its reports)."""
        return config.train.steps

    def total_steps(self, config: Config) -> int:
        """The optimizer step a finished run reports last."""
        return config.train.steps

    def actor_resources(self, config: Config) -> dict[str, float]:
        """CPUs and GPUs the stage's own Ray actors take beside the workers."""
        return {"CPU": 0.0, "GPU": 0.0}

    # -- hooks the loop calls on every worker -------------------------------------------------------------

    def batch_source(self, worker):
        raise NotImplementedError

    def build_model(self, worker):
        """(parts, modules, pipeline stage ids) this rank trains."""
        return worker.build_parts()

    def build_reference(self, worker):
        """A frozen model the objective's targets need (DPO's), or None."""
        return None

    def start_fresh(self, worker) -> None:
        """A new run's weights: train.init_from's, or the seeded initialisation."""
        worker.load_init_weights()

    def checkpoint_meta(self, worker) -> dict:
        """What this stage's checkpoints say of themselves beside what every checkpoint says."""
        return {}

    def lora_base(self, worker) -> str:
        """The checkpoint whose frozen weights a LoRA run adapts (its checkpoints hold the adapters only)."""
        return worker.train.init_from


class PreparedDataStage(Stage):
    """A stage that trains on prepared rows (pretrain, sft, reward, dpo): their data kind, and the model a run
    must start from, if any."""

    data_kind: str  # the manifest kind it reads (data/manifest.py DATA_COMMANDS)
    starts_from = ""  # what --init typically is ("a pre-training run"); empty: it may start from scratch
    what = ""  # what the stage makes, for the --init error ("fine-tuning")

    def cli_flags(self) -> list[tuple[str, str, dict]]:
        init = [("--init", "train.init_from", {"metavar": "CKPT|RUN|hf:DIR", "help": f"the model to start from "
                                                                             f"({self.starts_from})"})]
        return [("--data", "train.data", {"metavar": "DIR", "help": f"prepared dataset folder "
                                                                   f"({DATA_COMMANDS[self.data_kind]})"}),
                *(init if self.starts_from else []),
                ("--name", "run.name", {"help": "run name; rerunning a name resumes it"}),
                ("--steps", "train.steps", {"type": int}),
                ("--workers", "parallel.workers", {"type": int, "help": "Ray Train workers"})]

    def make_objective(self, config: Config, special: dict[str, int], multiple: int):
        """The objective for rows of a tokenizer with these special ids, inputs trimmed to a multiple long."""
        raise NotImplementedError

    def batch_source(self, worker):
        from raytrain.train.batches import PreparedBatches

        return PreparedBatches(worker, functools.partial(self.make_objective, worker.config))

    def check_data(self, dataset: PreparedDataset) -> None:
        """What this stage needs of its data beyond its kind (DPO: reply masks)."""

    def preflight(self, config: Config) -> Config:
        train = config.train
        if self.starts_from and not train.init_from:
            raise ConfigError(f"{self.what} starts from a model: pass --init runs/NAME ({self.starts_from}) or a "
                              "checkpoint folder (train.init_from)")
        if not train.data:
            raise ConfigError(f"config key 'train.data' is empty; set it to a folder from "
                              f"`{DATA_COMMANDS[self.data_kind]}`")
        # Workers run in other folders: hand them absolute paths.
        data = storage.absolute(train.data)
        init = str(resolve_checkpoint(train.init_from)) if train.init_from else ""
        dataset = PreparedDataset.open(data)
        if dataset.kind != self.data_kind:
            raise DataError(f"'{data}' holds {dataset.kind} data (from `{DATA_COMMANDS[dataset.kind]}`); "
                            f"`raytrain {self.name}` reads `{DATA_COMMANDS[self.data_kind]}` output")
        self.check_data(dataset)
        model = config.model
        if init:  # the weights fix the architecture: the model is the checkpoint's, whatever the config says
            init_meta = read_checkpoint_meta(init)
            model = TransformerConfig(**init_meta["model"])
            theirs = init_meta.get("tokenizer", {}).get("sha256")
            if theirs and theirs != dataset.tokenizer_sha256:
                raise DataError(f"'{data}' was prepared with another tokenizer "
                                f"({dataset.manifest['tokenizer']['path']}) than train.init_from '{init}' was trained "
                                f"with ({init_meta['tokenizer']['path']}); prepare the data with the model's tokenizer")
            if model != config.model:
                log.info("%s: the model is train.init_from's (%s, %d layers, d_model %d), not the config's model "
                         "section", self.name, model.family, model.n_layers, model.d_model)
        vocab = dataset.manifest["tokenizer"]["vocab_size"]
        if model.vocab_size < vocab:
            where = (f"train.init_from '{init}' has a vocabulary of {model.vocab_size}" if init else
                     f"config key 'model.vocab_size' is {model.vocab_size}")
            raise ConfigError(f"{where} but the data's tokenizer has {vocab} tokens "
                              f"({dataset.manifest['tokenizer']['path']}); "
                              + ("prepare the data with the model's own tokenizer" if init else
                                 f"set model.vocab_size={vocab}"))
        if self.objective_of(config) == "masked" and dataset.manifest["tokenizer"]["special_tokens"].get(
                "mask") is None:
            raise ConfigError(f"config key 'train.objective' is masked but the data's tokenizer "
                              f"({dataset.manifest['tokenizer']['path']}) has no mask token; use train.objective="
                              "causal")
        if train.tokenizer and tokenizer_hash(train.tokenizer) != dataset.tokenizer_sha256:
            raise DataError(f"'{data}' was prepared with another tokenizer than '{train.tokenizer}' "
                            f"({dataset.manifest['tokenizer']['path']}); prepare the data again or fix "
                            "train.tokenizer")
        if dataset.seq_len > model.max_seq_len:
            raise ConfigError(f"config key 'model.max_seq_len' is {model.max_seq_len} but the data's rows hold "
                              f"{dataset.seq_len} tokens; set model.max_seq_len >= {dataset.seq_len} or prepare "
                              "shorter rows")
        resolved = config.with_values({
            "model": vars(model), "train.data": data, "train.init_from": init,
            "train.objective": self.objective_of(config),
            # Each response's log-probability needs whole logits: under tp they are gathered, not vocabulary-split.
            **({"parallel.loss_parallel": False} if self.whole_logits else {})})
        self.check_layout(resolved, dataset.seq_len)
        self.check_lora(resolved, init)
        if dataset.split("train").num_rows == 0:
            raise DataError(f"'{data}' has no train rows")
        return resolved

    def run(self, config: Config, callbacks: tuple = ()) -> dict:
        from raytrain.cluster.resources import check_placement, use_gpus
        from raytrain.runtime import init_ray
        from raytrain.train.launch import fit

        resolved = self.preflight(config)
        seq_len = PreparedDataset.open(resolved.train.data).seq_len
        init_ray(resolved.runtime)
        check_placement(resolved, use_gpus(resolved))
        return fit(resolved, self, f"{resolved.train.steps} steps of {resolved.train.global_batch} sequences × "
                                   f"{seq_len} tokens", callbacks)
