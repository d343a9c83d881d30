"""One typed config tree: presets and YAML files, `key.sub=value` overrides, strict checks.

Every key and type is checked when the config is built, before Ray or any worker starts;
errors name the key, what was given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from raytrain.errors import ConfigError
from raytrain.model.config import TransformerConfig
from raytrain.vocabulary import MIN_VOCAB_SIZE

PRESET_DIR = Path(__file__).parent / "configs"


FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


@dataclass(frozen=True)
class RuntimeConfig:
    """How to reach Ray. Local defaults suit a small machine."""

    address: str | None = None  # None: $RAY_ADDRESS, else a running local cluster, else a new one; 'local': new
    num_cpus: int | None = None  # logical CPUs of a local Ray; None: max(4, 2 x cores)
    object_store_gib: float = 2.0  # object store of a local Ray
    # warning: raytrain's own lines and real warnings; info brings back Ray Train's and W&B's
    log_level: Literal["debug", "info", "warning", "error"] = "warning"
    progress: bool = True  # Ray Data progress bars
    # An autoscaling cluster: wait up to this long for the nodes a run needs, asked of the autoscaler; 0: the
    # resources must be there at start.
    resource_wait_s: float = 0.0

    def validate(self) -> None:
        _check(self.num_cpus is None or self.num_cpus >= 1, "runtime.num_cpus", "must be >= 1")
        _check(self.resource_wait_s >= 0, "runtime.resource_wait_s", "must be >= 0")
        _check(self.object_store_gib > 0, "runtime.object_store_gib", "must be > 0")


@dataclass(frozen=True)
class SourceConfig:
    """Where raw text comes from: files, folders, globs, s3:// or gs:// URIs, or `stdlib`."""

    # files, folders, globs, URIs, or 'stdlib' ('stdlib-qa' / 'stdlib-prefs' for chat and preference data)
    inputs: list[str] = field(default_factory=lambda: ["stdlib"])
    text_field: str = "text"  # JSONL field / Parquet column holding the document
    skip_bad_records: bool = False  # skip and count malformed JSONL lines instead of failing
    other_files_as_text: bool = False  # read folder files of other suffixes (LICENSE, .rst) as text, not skip them

    def validate(self) -> None:
        _check(bool(self.inputs), "data.source.inputs", "give at least one input")
        _check(bool(self.text_field), "data.source.text_field", "must not be empty")


@dataclass(frozen=True)
class TokenizerConfig:
    """Byte-level BPE training."""

    vocab_size: int = 8192  # tokens, special tokens and the 256 byte symbols included
    min_frequency: int = 2  # a merge must occur this often in the corpus
    split_digits: bool = False  # every digit a token of its own (numbers read digit by digit: arithmetic tasks)
    out: str = ""  # folder for tokenizer.json
    overwrite: bool = False  # replace an existing tokenizer folder (else refused)

    def validate(self) -> None:
        _check(
            self.vocab_size >= MIN_VOCAB_SIZE,
            "data.tokenizer.vocab_size",
            f"is {self.vocab_size}; it must be at least {MIN_VOCAB_SIZE} "
            "(256 byte symbols plus the special tokens)",
        )
        _check(self.min_frequency >= 1, "data.tokenizer.min_frequency", "must be >= 1")


@dataclass(frozen=True)
class PrepareConfig:
    """Tokenize, pack and shard a corpus with Ray Data."""

    tokenizer: str = ""  # folder holding tokenizer.json
    seq_len: int = 256  # rows hold seq_len + 1 tokens (inputs and shifted targets); preference rows seq_len
    val_fraction: float = 0.01  # share of documents (by content hash) in the val split
    seed: int = 0  # salts that hash: a document keeps its split for a given seed
    out: str = ""  # the dataset folder; it appears only when complete
    overwrite: bool = False  # replace an existing dataset folder (else refused)
    shard_mib: float = 64.0  # target size of one Parquet shard
    tokenize_actors: int = 0  # 0: one per 2 CPUs Ray offers, at most 8
    docs_per_batch: int = 128  # documents per tokenizer call

    def validate(self) -> None:
        _check(self.seq_len >= 2, "data.prepare.seq_len", f"is {self.seq_len}; it must be >= 2")
        _check(
            0.0 <= self.val_fraction < 1.0,
            "data.prepare.val_fraction",
            f"is {self.val_fraction}; it must be in [0, 1)",
        )
        _check(self.shard_mib > 0, "data.prepare.shard_mib", "must be > 0")
        _check(self.tokenize_actors >= 0, "data.prepare.tokenize_actors", "must be >= 0")
        _check(self.docs_per_batch >= 1, "data.prepare.docs_per_batch", "must be >= 1")


@dataclass(frozen=True)
class ChatDataConfig:
    """Record fields of fine-tuning data: `raytrain data sft` reads a prompt and a response, or a list of
    messages; `raytrain data prefs` a prompt with chosen and rejected, or responses and their ranking."""

    prompt_field: str = "prompt"  # the user turn
    response_field: str = "response"  # the assistant reply the loss is on
    messages_field: str = "messages"  # [{role, content}, ...]; used when a record has it
    chosen_field: str = "chosen"  # the preferred response
    rejected_field: str = "rejected"  # the response ranked below it
    responses_field: str = "responses"  # [text, ...] with ranking_field: their indices, best first
    ranking_field: str = "ranking"  # indices into responses_field, best first
    completion_field: str = "completion"  # `raytrain data kto`: the completion a label judges
    label_field: str = "label"  # `raytrain data kto`: true for a desirable completion, false for an undesirable one

    def validate(self) -> None:
        for name in ("prompt_field", "response_field", "messages_field", "chosen_field", "rejected_field",
                     "responses_field", "ranking_field", "completion_field", "label_field"):
            _check(bool(getattr(self, name)), f"data.chat.{name}", "must not be empty")


@dataclass(frozen=True)
class DataConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    chat: ChatDataConfig = field(default_factory=ChatDataConfig)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (model/lora.py) on a frozen base: rank 0 trains every weight."""

    rank: int = 0  # the adapters' rank r; 0: no adapters
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # linear layers by name
    quantize: str = "none"  # "int8": QLoRA, the adapted layers' frozen weights held in int8 (one scale a row)

    def validate(self) -> None:
        _check(self.rank >= 0, "train.lora.rank", "must be >= 0 (0: no adapters)")
        _check(self.alpha > 0, "train.lora.alpha", "must be > 0")
        _check(0 <= self.dropout < 1, "train.lora.dropout", "must be in [0, 1)")
        _check(bool(self.target_modules), "train.lora.target_modules",
               f"must name at least one linear layer ({', '.join(LORA_TARGETS)})")
        _check(self.quantize in ("none", "int8"), "train.lora.quantize", "must be none or int8")
        _check(self.quantize == "none" or self.rank > 0, "train.lora.quantize",
               "quantizes a LoRA run's frozen base: set train.lora.rank > 0 too")


@dataclass(frozen=True)
class TrainConfig:
    """The shared training loop: pre-training here; SFT, reward and PPO reuse it."""

    data: str = ""  # a prepared dataset folder (raytrain data prepare)
    tokenizer: str = ""  # optional: must be the tokenizer the data was prepared with
    # What the loop trains: one of a stage's objectives (raytrain/stages/); the stage commands set their own.
    objective: str = "causal"
    mask_fraction: float = 0.15  # masked LM: share of positions replaced by <|mask|>
    seed: int = 0  # weights and batch order
    steps: int = 100  # optimizer steps (PPO: set from the ppo section)
    global_batch: int = 32  # sequences per optimizer step, over all data-parallel ranks
    micro_batches: int = 1  # gradient accumulation: forward/backward passes per step and rank
    lr: float = 1e-3  # peak learning rate, after warmup
    min_lr_ratio: float = 0.1  # cosine decay ends at lr × this
    warmup_steps: int = 10  # linear warmup from 0 to lr
    weight_decay: float = 0.1  # AdamW decay, not on norms and biases
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    grad_clip: float = 1.0  # global norm; 0 turns clipping off
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast, fp32 master weights
    log_every: int = 10  # steps between progress lines and metrics.jsonl records
    val_every: int = 50  # 0: only at the end
    val_batches: int = 4  # global batches of the val split per validation
    checkpoint_every: int = 50  # also the cadence of ray.train.report
    keep_checkpoints: int = 2  # the newest this many stay in the run folder
    max_failures: int = 1  # worker failures Ray Train recovers from by restarting
    init_from: str = ""  # a raytrain checkpoint or run to start from, or a Hugging Face folder (hf:DIR)
    peak_tflops: float = 0.0  # per worker, for MFU; 0: measured on the machine at start
    dpo_beta: float = 0.1  # DPO: strength of the implicit KL penalty to the reference (β)
    simpo_beta: float = 2.0  # SimPO: scale of the length-normalised log-probability reward (β)
    simpo_gamma: float = 0.5  # SimPO: the reward margin a preferred response must win by (γ)
    orpo_lambda: float = 0.1  # ORPO: weight of the odds-ratio term beside the preferred responses' NLL (λ)
    kto_beta: float = 0.1  # KTO: scale of the implicit reward log π − log π_ref against the reference point (β)
    kto_desirable_weight: float = 1.0  # KTO: weight of the desirable completions' losses (λ_D)
    kto_undesirable_weight: float = 1.0  # KTO: weight of the undesirable completions' losses (λ_U)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # adapters on a frozen base (sft, reward, dpo, ppo)
    packing: bool = False  # sft, reward, dpo: a micro-batch's examples packed into rows, each attending to itself

    def validate(self) -> None:
        for key in ("steps", "global_batch", "micro_batches", "log_every", "val_batches", "keep_checkpoints"):
            _check(getattr(self, key) >= 1, f"train.{key}", "must be >= 1")
        _check(0 < self.mask_fraction < 1, "train.mask_fraction", "must be in (0, 1)")
        _check(self.lr > 0, "train.lr", "must be > 0")
        for key in ("dpo_beta", "simpo_beta", "orpo_lambda", "kto_beta", "kto_desirable_weight",
                    "kto_undesirable_weight"):
            _check(getattr(self, key) > 0, f"train.{key}", "must be > 0")
        _check(self.simpo_gamma >= 0, "train.simpo_gamma", "must be >= 0")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")


@dataclass(frozen=True)
class ParallelConfig:
    """The layout of the Ray Train workers: a DeviceMesh of dp_replicate × dp_shard × tp."""

    workers: int = 1  # Ray Train workers; must equal pp × dp_replicate × dp_shard × tp
    pp: int = 1  # pipeline stages across ranks (outermost mesh dim)
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"  # torch.distributed.pipelining schedule
    pp_virtual_stages: int = 1  # stages per rank; interleaved_1f1b needs >= 2
    pp_layers: list[int] = field(default_factory=list)  # layers per stage; empty: as even as possible
    dp_replicate: int = 1  # data-parallel replicas (with dp_shard > 1: HSDP)
    dp_shard: int = -1  # FSDP2 shards; -1: inferred as workers / (pp × dp_replicate × tp)
    tp: int = 1  # tensor parallel (DTensor), innermost so it stays inside a node
    sequence_parallel: bool = True  # with tp > 1: norms and residual stream split over the sequence
    loss_parallel: bool = True  # with tp > 1: cross-entropy on vocabulary-split logits, never gathered
    activation_checkpointing: Literal["none", "full"] = "none"  # full: recompute blocks' activations in backward
    ac_every: int = 1  # with full: checkpoint every n-th block
    compile: bool = False  # torch.compile each transformer block
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = 1.0  # Ray CPUs each worker takes (fractions allowed)
    # How Ray places the workers' bundles: PACK fills a node first; STRICT_SPREAD puts each worker on its own
    # node (one process per GPU node), SPREAD does so when it can.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def validate(self) -> None:
        for key in ("workers", "pp", "pp_virtual_stages", "dp_replicate", "tp", "ac_every"):
            _check(getattr(self, key) >= 1, f"parallel.{key}", "must be >= 1")
        interleaved = self.pp_schedule == "interleaved_1f1b"
        _check(interleaved == (self.pp_virtual_stages > 1), "parallel.pp_virtual_stages",
               f"is {self.pp_virtual_stages} with pp_schedule {self.pp_schedule}; interleaved_1f1b needs >= 2 "
               "virtual stages per rank, gpipe and 1f1b exactly 1")
        _check(self.dp_shard == -1 or self.dp_shard >= 1, "parallel.dp_shard", "must be >= 1, or -1 to infer it")
        _check(self.cpus_per_worker > 0, "parallel.cpus_per_worker", "must be > 0")
        fixed = self.pp * self.dp_replicate * self.tp
        if self.dp_shard == -1:
            _check(self.workers % fixed == 0, "parallel.workers",
                   f"{self.workers} is not divisible by pp × dp_replicate × tp = {fixed}; "
                   "make workers a multiple of it")
        else:
            _check(self.workers == fixed * self.dp_shard, "parallel.workers",
                   f"{self.workers} differs from pp × dp_replicate × dp_shard × tp = {fixed * self.dp_shard}; "
                   "make them equal (or set dp_shard=-1)")

    @property
    def shard(self) -> int:
        return self.dp_shard if self.dp_shard != -1 else self.workers // (self.pp * self.dp_replicate * self.tp)

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many slices each global batch is cut into."""
        return self.dp_replicate * self.shard


# PPO's health monitors (rlhf/health.py): each a metric health/NAME, a warning and a W&B alert when it fires.
Monitor = Literal["kl_spike", "length_blowup", "entropy_collapse", "clip_fraction", "reward_divergence",
                  "repeated_response"]


@dataclass(frozen=True)
class HealthConfig:
    """When each of PPO's health monitors fires; checked every iteration on numbers every rank shares."""

    kl_spike: float = 3.0  # ppo/kl above this × the mean of the last 10 iterations' (and above kl_floor)
    kl_floor: float = 1.0  # nats: a smaller KL is no spike
    length_growth: float = 2.0  # ppo/response_len above this × the first iteration's
    entropy_drop: float = 0.1  # ppo/entropy below this × the first iteration's
    clipfrac_max: float = 0.3  # ppo/clipfrac above this (updates too large for the clip range)
    reward_gap: float = 0.25  # held-out reward fell and train reward rose by over this × the first nonzero reward std
    repeat_fraction: float = 0.5  # one response given to at least this fraction of an iteration's prompts (≥ 4)

    def validate(self) -> None:
        for key in ("kl_spike", "length_growth", "reward_gap"):
            _check(getattr(self, key) > 0, f"ppo.health.{key}", "must be > 0")
        for key in ("kl_floor", "entropy_drop"):
            _check(getattr(self, key) >= 0, f"ppo.health.{key}", "must be >= 0")
        for key in ("clipfrac_max", "repeat_fraction"):
            _check(0 < getattr(self, key) <= 1, f"ppo.health.{key}", "must be in (0, 1]")


@dataclass(frozen=True)
class PPOConfig:
    """`raytrain ppo`: rollouts from a pool of Ray actors, scores from another, the learner on the one loop.

    One iteration generates `samples_per_prompt` responses to each of `prompts_per_iteration` prompts, scores
    them, then takes `epochs` × `minibatches` optimizer steps on them. train.log_every, val_every and
    checkpoint_every count iterations here.
    """

    algorithm: str = "ppo"  # ppo, grpo, rloo, reinforce++, dapo, gspo (rlhf/algorithms/; docs/training.md)
    policy: str = ""  # checkpoint or run folder to start from (an SFT run); the KL reference too
    reward: str = ""  # a reward checkpoint or run folder, python:module:function, or http(s)://HOST:PORT/PATH
    prompts: str = ""  # 'stdlib-qa', or JSONL files/folders of 'prompt' or 'messages' records
    iterations: int = 20  # rollout → update rounds
    prompts_per_iteration: int = 16  # prompts drawn per iteration
    samples_per_prompt: int = 1  # GRPO's group size G (> 1)
    max_new_tokens: int = 32  # response length cap
    drop_long_prompts: bool = False  # skip prompts with no room for max_new_tokens (else: an error)
    temperature: float = 1.0  # rollout sampling
    top_k: int = 0  # rollout sampling; 0: off
    top_p: float = 1.0  # rollout sampling; 1: off
    epochs: int = 1  # passes over each rollout batch
    minibatches: int = 2  # optimizer steps per epoch over the rollout batch
    kl_coef: float = 0.01  # β: KL to the reference, in the reward (ppo, rloo, reinforce++) or the loss (the rest)
    kl_target: float = 0.0  # > 0: adaptive β keeps the sequence KL near this (Ziegler et al.)
    kl_horizon: int = 10000  # adaptive β's horizon in samples
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE λ
    clip: float = 0.0  # policy ratio clip ε (ε_low); 0: the algorithm's (0.2; gspo 3e-4)
    clip_high: float = 0.0  # ε_high; 0: ε_low if ppo.clip is set, else the algorithm's (dapo 0.28, gspo 4e-4)
    overlong_buffer: int = 0  # > 0: DAPO's soft overlong penalty over the last this many of max_new_tokens
    value_clip: float = 0.5  # the value model's change per update is clipped to ±this
    value_coef: float = 0.1  # weight of the value loss beside the policy loss
    entropy_coef: float = 0.0  # entropy bonus in the policy loss
    score_clip: float = 10.0  # the normalised reward-model score is clipped to ±this
    rollout_actors: int = 1  # Ray actors that generate
    rollout_batch: int = 0  # most samples per generate call (bounds an actor's KV cache); 0: one call per actor
    reward_actors: int = 1  # Ray actors that score and give the reference's log-probs
    actor_cpus: float = 0.5  # per actor; fractional allowed
    actor_gpus: float = 0.0  # per actor; fractional allowed
    actor_restarts: int = 3  # a dead actor is restarted and its call resubmitted this many times
    rollout_engine: str = "native"  # what the rollout actors generate with (rlhf/engines/): native (our KV cache)
    tis_cap: float = 2.0  # truncated importance sampling: a token's policy loss × min(π_learner/π_engine, this); 0: off
    async_rollouts: bool = False  # generate the next iterations' rollouts while the learner trains on this one
    max_staleness: int = 1  # async: a rollout is generated by weights at most this many iterations old
    weight_sync: Literal["stream", "object_store"] = "stream"  # to the rollout actors: in buckets, or ray.put whole
    # A LoRA policy to the rollout actors: merged weights, or its adapters only (after one whole sync), each actor
    # merging them into the base it keeps
    lora_sync: Literal["merged", "adapters"] = "merged"
    sync_bucket_mb: float = 64.0  # weight sync: the policy goes to the rollout actors in buckets of this size
    sync_timeout_s: float = 120.0  # weight sync: a bucket not through by then fails the sync (an actor is gone)
    val_prompts: int = 32  # held-out prompts scored (greedy) every train.val_every iterations
    samples_logged: int = 4  # (prompt, response, reward, KL) per logged iteration in samples.jsonl
    health: HealthConfig = field(default_factory=HealthConfig)
    stop_on: list[Monitor] = field(default_factory=list)  # health monitors that end the run (with a checkpoint)

    def validate(self) -> None:
        for key in ("iterations", "prompts_per_iteration", "samples_per_prompt", "max_new_tokens", "epochs",
                    "minibatches", "rollout_actors", "reward_actors", "kl_horizon", "max_staleness"):
            _check(getattr(self, key) >= 1, f"ppo.{key}", "must be >= 1")
        for key in ("sync_bucket_mb", "sync_timeout_s"):
            _check(getattr(self, key) > 0, f"ppo.{key}", "must be > 0")
        for key in ("kl_coef", "kl_target", "clip", "clip_high", "overlong_buffer", "tis_cap",
                    "value_clip", "value_coef", "entropy_coef", "score_clip",
                    "actor_cpus", "actor_gpus", "temperature", "actor_restarts", "val_prompts", "samples_logged",
                    "rollout_batch"):
            _check(getattr(self, key) >= 0, f"ppo.{key}", "must be >= 0")
        _check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "ppo.gamma", "gamma and lam must be in [0, 1]")
        _check(0 < self.top_p <= 1, "ppo.top_p", "must be in (0, 1]")
        from raytrain.rlhf.algorithms import ALGORITHMS
        from raytrain.rlhf.engines import ENGINES

        _check(self.rollout_engine in ENGINES, "ppo.rollout_engine", f"is {self.rollout_engine!r}; choose one of: "
               f"{', '.join(ENGINES)}")

        _check(self.algorithm in ALGORITHMS, "ppo.algorithm", f"is {self.algorithm!r}; choose one of: "
               f"{', '.join(ALGORITHMS)}")
        if ALGORITHMS[self.algorithm].grouped:
            _check(self.samples_per_prompt > 1, "ppo.samples_per_prompt",
                   f"must be > 1 for {self.algorithm} (advantages compare the samples of one prompt)")
        _check(self.tis_cap == 0 or self.tis_cap >= 1, "ppo.tis_cap", "must be 0 (off) or >= 1")
        _check(self.lora_sync == "merged" or self.weight_sync == "stream", "ppo.lora_sync",
               "adapters needs ppo.weight_sync=stream (the object store sends whole policies)")
        _check(self.overlong_buffer <= self.max_new_tokens, "ppo.overlong_buffer",
               f"must be <= ppo.max_new_tokens ({self.max_new_tokens})")
        rollout = self.prompts_per_iteration * self.samples_per_prompt
        _check(rollout % self.minibatches == 0, "ppo.minibatches",
               f"must divide the {rollout} responses of an iteration (prompts_per_iteration × samples_per_prompt)")


@dataclass(frozen=True)
class TrackingConfig:
    mode: Literal["auto", "offline", "online", "disabled"] = "auto"  # auto: online iff WANDB_API_KEY
    project: str = "raytrain"  # W&B project
    group: str = ""  # W&B run group; a sweep's trials are grouped by the sweep's name


@dataclass(frozen=True)
class DebugConfig:
    fail_at_step: int = -1  # a worker exits its process once at this step (fault-tolerance tests)
    fail_rank: int = 0  # the world rank that fails at fail_at_step
    fail_actor_at_iteration: int = -1  # PPO: rollout actor 0 dies mid-sync + mid-generate, reward actor 0 mid-score
    track_memory: bool = False  # CPU: count live tensor bytes to log mem/tensor_peak_gib (slows each step)
    step_sleep_s: float = 0.0  # each step waits this long: a run that tests can stop midway (ray job stop)


@dataclass(frozen=True)
class RunConfig:
    name: str = "demo"  # the run folder's name: root/name; rerunning a name resumes it
    root: str = "runs"  # run folders live in root/name; a URI (s3://bucket/runs) holds them on object storage
    task: str = ""  # `raytrain demo`: a verifiable task (arith, sort; raytrain/tasks/) to run the task chain on

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name

    @property
    def location(self) -> str:
        """The run folder: an absolute path, or root's URI joined with the name."""
        from raytrain import storage

        return storage.join(storage.absolute(self.root), self.name)


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: TransformerConfig = field(default_factory=TransformerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        from raytrain import storage

        storage.write_text(path, self.to_yaml())

    def with_values(self, values: dict[str, Any]) -> Config:
        """A new config with dotted keys set to `values`, rebuilt and checked like any config (configs are
        frozen: this is how a stage resolves its own, and a sweep draws a trial's)."""
        tree = self.to_dict()
        for key, value in values.items():
            *sections, leaf = key.split(".")
            node = tree
            for section in sections:
                node = node[section]
            node[leaf] = value
        return config_from_dict(tree)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(source: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from a preset name or YAML path, then `key.sub=value` overrides."""
    tree: dict[str, Any] = {}
    if source:
        tree = _read_yaml(_resolve_source(source))
    for item in overrides:
        _apply_override(tree, item)
    config = _build(Config, tree, "")
    _validate(config)
    return config


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` (how workers receive it), checked as strictly."""
    config = _build(Config, tree, "")
    _validate(config)
    return config


def _resolve_source(source: str) -> str | Path:
    from raytrain import storage

    if storage.is_uri(source):  # e.g. a sweep's best.yaml on object storage
        if not storage.is_file(source):
            raise ConfigError(f"config file '{source}' does not exist")
        return source
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file '{source}' does not exist")
        return path
    preset = PRESET_DIR / f"{source}.yaml"
    if not preset.is_file():
        raise ConfigError(
            f"'{source}' is neither a config file nor a preset; presets: {', '.join(presets())}"
        )
    return preset


def _read_yaml(path: str | Path) -> dict[str, Any]:
    from raytrain import storage

    try:
        tree = yaml.safe_load(storage.read_text(path)) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    return tree


def _apply_override(tree: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
    node[parts[-1]] = value


def _build(cls: type, tree: Any, prefix: str) -> Any:
    if not isinstance(tree, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<top>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in tree:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'{hint}; valid keys: {', '.join(names)}"
            )
    values = {name: _convert(hints[name], tree[name], prefix + name) for name in names if name in tree}
    return cls(**values)


def _convert(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"config key '{key}' is {value!r}; choose one of: {', '.join(map(str, args))}"
            )
        return value
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(items)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and FLOAT_TEXT.match(value):  # YAML 1.1 reads 1e-5 as text
        return float(value)
    if hint is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(
            f"config key '{key}' must be {hint.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _validate(node: Any) -> None:
    if hasattr(node, "validate"):
        node.validate()
    for f in dataclasses.fields(node):
        child = getattr(node, f.name)
        if dataclasses.is_dataclass(child):
            _validate(child)
