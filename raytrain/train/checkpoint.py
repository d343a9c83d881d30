"""Checkpoints: torch.distributed.checkpoint shards plus `raytrain.json`, resharded on load.

A checkpoint folder holds the DCP files (one per rank, written in parallel) with the keys
`model` and, for training checkpoints, `optim` and `stage` (what the stage's batch source needs to resume:
PPO's iteration and KL coefficient); and `raytrain.json` with the model config, the step, the stage, the
model's head and what the run was trained on. DCP reshards on load, so a checkpoint saved by
any number of ranks loads under any other, and in a single process for eval and export.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.planner import SavePlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    _get_fqns,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from raytrain import storage
from raytrain.errors import DataError
from raytrain.model.lora import is_adapter
from raytrain.model.transformer import Transformer, TransformerConfig
from raytrain.parallel.materialize import local_slices
from raytrain.train.hf_checkpoint import HF_SCHEME, hf_folder, hf_meta, load_hf_weights, read_hf_tensor

META_FILE = "raytrain.json"
CHECKPOINTS_DIR = "checkpoints"  # a run folder's checkpoints/step_NNNNNN/ (Ray Train's run name)
DCP_METADATA = ".metadata"
FORMAT = "raytrain.checkpoint/2"  # /2: the stage, head and weights prefix are named in raytrain.json


NEW_HEAD = "score."  # the one part of a model that may start fresh (a reward model's head)
# Optimizer state keyed by parameter name: the same keys under every layout and pipeline split.
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
# A LoRA run's checkpoints hold what trains; its frozen base is loaded from where it came from.
FLAT_TRAINED = StateDictOptions(flatten_optimizer_state_dict=True, strict=False)


def frozen_keys(part: torch.nn.Module) -> set[str]:
    """The state-dict keys of a part's frozen parameters (a LoRA run's base), the wrappers' prefixes dropped."""
    return {fqn for name, p in part.named_parameters() if not p.requires_grad for fqn in _get_fqns(part, name)}


def _training_state(parts: list[torch.nn.Module], optimizers: list) -> tuple[dict, list[set[str]]]:
    """This rank's share of model and optimizer state (trained parameters only), and which model keys each part
    owns."""
    model_state, optim_state, owned = {}, {}, []
    for part, optimizer in zip(parts, optimizers, strict=True):
        part_model, part_optim = get_state_dict(part, optimizer, options=FLAT)
        frozen = frozen_keys(part)
        part_model = {key: value for key, value in part_model.items() if key not in frozen}
        model_state.update(part_model)
        optim_state.update(part_optim)
        owned.append(set(part_model))
    return {"model": model_state, "optim": optim_state}, owned


def save_training_checkpoint(folder: Path, parts: list[torch.nn.Module], optimizers: list, stage_state: dict,
                             meta: dict, write_meta: bool) -> None:
    state, _ = _training_state(parts, optimizers)
    with single_process_quiet():  # a loop run in one process (train/local.py) has no process group
        dcp.save({**state, "stage": stage_state}, checkpoint_id=str(folder))
    if write_meta:
        write_checkpoint_meta(folder, meta)


def load_training_checkpoint(folder: Path, parts: list[torch.nn.Module], optimizers: list,
                             stage_state: dict) -> tuple[dict, dict]:
    """Load model and optimizer state in place; returns (raytrain.json, the stage's state). `stage_state`
    names the stage's keys (its current values)."""
    meta = read_checkpoint_meta(folder)
    state, owned = _training_state(parts, optimizers)
    state["stage"] = dict(stage_state)
    with single_process_quiet():
        dcp.load(state, checkpoint_id=str(folder))
    for part, optimizer, keys in zip(parts, optimizers, owned, strict=True):
        set_state_dict(part, optimizer, model_state_dict={k: state["model"][k] for k in keys},
                       optim_state_dict=state["optim"], options=FLAT_TRAINED if frozen_keys(part) else FLAT)
    return meta, state["stage"]


def load_weights(folder: str | Path, model: torch.nn.Module) -> dict:
    """Model weights only (to start a new run from a checkpoint), under any layout.

    A reward model started from a language model takes its trunk and keeps its own new score head. From a PPO
    checkpoint it is the policy that loads. A checkpoint on object storage (a URI) is copied to a local temp
    folder first (DCP reads files).
    """
    if (hf := hf_folder(folder)) is not None:
        return load_hf_weights(hf, model)
    if storage.is_uri(folder):
        with storage.local_copy(folder) as local:
            return load_weights(local, model)
    meta = read_checkpoint_meta(folder)
    if "lora" in meta:
        return _load_adapted(folder, meta, model)
    prefix = meta["weights_prefix"]
    wanted = {key: value for key, value in get_model_state_dict(model).items() if not is_adapter(key)}
    stored = stored_keys(folder)
    missing = [key for key in wanted if prefix + key not in stored]
    if any(not key.startswith(NEW_HEAD) for key in missing):
        raise DataError(f"checkpoint '{folder}' lacks the model's weights {missing[:4]}; start from a checkpoint "
                        "of this model family")
    state = {"model": {prefix + key: value for key, value in wanted.items() if prefix + key in stored}}
    with single_process_quiet():
        dcp.load(state, checkpoint_id=str(folder))
    loaded = {key.removeprefix(prefix): value for key, value in state["model"].items()}
    set_model_state_dict(model, loaded, options=StateDictOptions(strict=False))
    return meta


def stored_keys(folder: str | Path) -> set[str]:
    """The model keys a local checkpoint holds (weights prefix included)."""
    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {key.removeprefix("model.") for key in saved if key.startswith("model.")}


@torch.no_grad()
def _load_adapted(folder: str | Path, meta: dict, model: torch.nn.Module) -> dict:
    """A LoRA run's checkpoint into a model under any layout: its base's weights, what it trained beside the
    adapters (a score head), then each adapter's update B·A·alpha/rank added to the weight it adapts (this rank's
    slice of it): the adapted model, merged. A model with adapters of its own keeps them as they are (a LoRA run
    started from a LoRA run adapts the merged model)."""
    load_weights(meta["lora"]["base"], model)
    prefix, stored = meta["weights_prefix"], stored_keys(folder)
    trained = {key: value for key, value in get_model_state_dict(model).items()
               if prefix + key in stored and not is_adapter(key)}
    if trained:
        state = {"model": {prefix + key: value for key, value in trained.items()}}
        with single_process_quiet():
            dcp.load(state, checkpoint_id=str(folder))
        set_model_state_dict(model, {key.removeprefix(prefix): value for key, value in state["model"].items()},
                             options=StateDictOptions(strict=False))
    weights = get_model_state_dict(model)
    for layer in adapted_layers(stored, prefix):
        local_delta(weights[layer + ".weight"], lora_delta(folder, meta, layer))
    return meta


def adapted_layers(stored: set[str], prefix: str) -> list[str]:
    """The layers a LoRA checkpoint adapts (by the names of its lora_A tensors)."""
    return sorted(key.removeprefix(prefix).removesuffix(".lora_A.weight") for key in stored
                  if key.startswith(prefix) and key.endswith(".lora_A.weight"))


def lora_delta(folder: str | Path, meta: dict, layer: str) -> torch.Tensor:
    """B·A·alpha/rank of one adapted layer of a local LoRA checkpoint, whole (fp32)."""
    lora = meta["lora"]
    a, b = (read_tensor(folder, meta, f"{layer}.lora_{which}.weight").float() for which in "AB")
    return b @ a * (lora["alpha"] / lora["rank"])


def local_delta(param: torch.Tensor, delta: torch.Tensor) -> None:
    """Add what this rank holds of a whole update to a parameter (or its shard)."""
    slices, local = local_slices(param)
    local.add_(delta[slices].to(local.dtype))


def read_tensor(folder: str | Path, meta: dict, name: str) -> torch.Tensor:
    """One of the model's tensors from a local checkpoint folder (DCP reads only that key's bytes): a converter's
    way to hold one tensor at a time. From a LoRA run's checkpoint, a weight it did not train is its base's, an
    adapted one merged with its update."""
    if "lora" in meta and meta["weights_prefix"] + name not in stored_keys(folder):
        value = read_base_tensor(meta["lora"]["base"], name)
        adapter = name.removesuffix(".weight")
        if f"{meta['weights_prefix']}{adapter}.lora_A.weight" in stored_keys(folder):
            value = (value.float() + lora_delta(folder, meta, adapter)).to(value.dtype)
        return value
    key = "model." + meta["weights_prefix"] + name
    stored = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata[key]
    state = {"model": {meta["weights_prefix"] + name: torch.empty(tuple(stored.size), dtype=stored.properties.dtype)}}
    with single_process_quiet():
        dcp.load(state, checkpoint_id=str(folder))
    return state["model"][meta["weights_prefix"] + name]


def read_base_tensor(base: str, name: str) -> torch.Tensor:
    """One tensor of a LoRA run's base: a raytrain checkpoint (on object storage too) or a Hugging Face folder."""
    if (hf := hf_folder(base)) is not None:
        return read_hf_tensor(hf, name)
    with storage.local_copy(base) as local:
        return read_tensor(local, read_checkpoint_meta(local), name)


def model_head(meta: dict) -> str:
    """The output layer of a checkpoint's model: "score" (a reward model's) or "lm"."""
    return meta["head"]


@contextlib.contextmanager
def single_process_quiet():
    """DCP in one process (generate, eval, convert) is intended: drop its warning that it assumes so."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def write_checkpoint_meta(folder: Path, meta: dict) -> None:
    (folder / META_FILE).write_text(json.dumps({"format": FORMAT, **meta}, indent=2))


def read_checkpoint_meta(folder: str | Path) -> dict:
    if (hf := hf_folder(folder)) is not None:
        return hf_meta(hf)
    path = storage.join(folder, META_FILE)
    if not storage.is_file(path):
        raise DataError(f"'{folder}' is not a raytrain checkpoint (no {META_FILE})")
    meta = json.loads(storage.read_text(path))
    if meta.get("format") != FORMAT:
        raise DataError(f"'{folder}' is a {meta.get('format')} checkpoint; this raytrain reads {FORMAT}: train it "
                        "again, or convert it with the raytrain that wrote it (convert to-hf, then from-hf here)")
    return meta


def resolve_checkpoint(path: str | Path) -> str | Path:
    """A checkpoint folder, or the latest complete checkpoint of a run folder (a URI for one on object storage), or
    a Hugging Face folder (`hf:DIR`); local paths made absolute (workers and later commands run elsewhere)."""
    if (hf := hf_folder(path)) is not None:
        return f"{HF_SCHEME}{hf.absolute()}"
    if storage.is_file(storage.join(path, META_FILE)):
        return str(path).rstrip("/") if storage.is_uri(path) else Path(path).absolute()
    latest = latest_checkpoint(path)
    if latest is None:
        example = "s3://…/NAME or s3://…/NAME/checkpoints/step_N" if storage.is_uri(path) else \
            "runs/NAME or runs/NAME/checkpoints/step_N"
        raise DataError(f"'{path}' is neither a checkpoint nor a run folder with checkpoints; pass {example}")
    return latest if storage.is_uri(path) else Path(latest).absolute()


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """The newest complete checkpoint in a run folder's checkpoints/ (a path or a URI), or None.

    Complete: raytrain.json, DCP's .metadata and every file the metadata names are there. (Ray Train takes a
    reported checkpoint into its books only when its controller next polls the workers, every 2 s: one that
    a dying worker reported just before is in the run folder all the same.)"""
    folder = storage.join(run_dir, CHECKPOINTS_DIR)
    files: dict[str, set[str]] = {}
    for name in storage.list_files(folder):
        step, _, file = name.partition("/")
        files.setdefault(step, set()).add(file)
    for step in sorted(files, reverse=True):  # step_NNNNNN: the names sort by step
        checkpoint = storage.join(folder, step)
        if {META_FILE, DCP_METADATA} <= files[step] and _dcp_files(checkpoint) <= files[step]:
            return checkpoint
    return None


def _dcp_files(checkpoint: str) -> set[str]:
    """The shard files DCP's metadata says the checkpoint holds."""
    metadata = pickle.loads(storage.read_bytes(storage.join(checkpoint, DCP_METADATA)))
    return {info.relative_path for info in metadata.storage_data.values()}


def load_model(path: str | Path, device: str = "cpu") -> tuple[Transformer, dict]:
    """Load a checkpoint's model in this process (no process group needed)."""
    folder = resolve_checkpoint(path)
    meta = read_checkpoint_meta(folder)
    model = Transformer(TransformerConfig(**meta["model"]), head=model_head(meta))
    load_weights(folder, model)
    return model.to(device).eval(), meta


def save_model(folder: Path, model: Transformer, meta: dict, planner: SavePlanner | None = None) -> None:
    """A weights-only checkpoint written by this process, raytrain.json last.

    planner: one that gives each tensor's bytes only when the writer asks for them, the model being on the meta
    device (hf_checkpoint.HFTensorReader: convert from-hf). Then each tensor goes to a file of its own, since DCP's
    writer holds every tensor of a file until the file is closed: the peak is one tensor, not the model."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = dcp.FileSystemWriter(str(folder), single_file_per_rank=planner is None)
    with single_process_quiet():
        dcp.save({"model": model.state_dict()}, storage_writer=writer, planner=planner)
    head = "score" if model.score is not None else "lm"
    write_checkpoint_meta(folder, {"model": vars(model.config), "head": head, "weights_prefix": "", **meta})


def checkpoint_tokenizer(meta: dict, override: str | None) -> str:
    """The tokenizer folder (or URI) a checkpoint's data used, or --tokenizer."""
    from raytrain.data.tokenizer import TOKENIZER_FILE

    folder = override or meta["tokenizer"]["path"]
    if not storage.is_file(storage.join(folder, TOKENIZER_FILE)):
        raise DataError(f"tokenizer '{folder}' not found; pass --tokenizer DIR")
    return folder
