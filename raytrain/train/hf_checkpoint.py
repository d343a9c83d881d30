"""A Hugging Face model folder read as a checkpoint, as it is: `train.init_from=hf:DIR` (or any folder that holds
config.json and *.safetensors), `--policy`, `--reward`, `generate`/`eval --checkpoint`.

Its raytrain.json is derived from config.json (the family's options, refused by name where our decoder computes
something else) and the tokenizer beside it. Every tensor's name, shape and file is checked from the safetensors
headers before a worker starts; then each rank reads only the slices of the tensors it holds (safetensors' lazy
slices), so no rank, and no driver, ever holds the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from raytrain import storage
from raytrain.config import TrainConfig
from raytrain.errors import DataError
from raytrain.model.hf import INDEX_FILE, config_from_hf, hf_name
from raytrain.model.transformer import Transformer, TransformerConfig
from raytrain.parallel.materialize import local_slices

HF_SCHEME = "hf:"
IGNORED = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved; computed here


def hf_folder(path: str | Path) -> Path | None:
    """The folder of `hf:DIR`, or of a local folder holding config.json and no raytrain.json; else None."""
    text = str(path)
    if text.startswith(HF_SCHEME):
        return Path(text.removeprefix(HF_SCHEME))
    folder = Path(text)
    if storage.is_uri(text) or not (folder / "config.json").is_file() or (folder / "raytrain.json").exists():
        return None
    return folder


def hf_meta(folder: Path) -> dict:
    """What a raytrain.json would say of this folder (its model, head and tokenizer; step 0), every tensor it
    needs checked first (tensor_files): a folder that cannot load fails here, before a worker starts."""
    return open_hf(folder)[0]


def open_hf(folder: Path) -> tuple[dict, dict[str, Path]]:
    """(the folder's meta, which file holds each tensor)."""
    from raytrain.data.tokenizer import TOKENIZER_FILE

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise DataError(f"'{folder}' has no config.json; point at a Hugging Face model folder")
    hf = json.loads(config_path.read_text())
    head = "score" if any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or []) else "lm"
    meta = {"step": 0, "model": vars(config_from_hf(hf, config_path)), "head": head, "weights_prefix": "",
            "stage": "pretrain", "objective": TrainConfig.objective, "mask_fraction": TrainConfig.mask_fraction,
            "seed": 0, "source": f"{HF_SCHEME}{folder}"}
    if (folder / TOKENIZER_FILE).is_file():
        from raytrain.data.prepare import tokenizer_info  # (imports the data pipeline: only where needed)

        meta["tokenizer"] = tokenizer_info(str(folder))
    return meta, tensor_files(folder, meta)


def tensor_files(folder: Path, meta: dict) -> dict[str, Path]:
    """Which file holds each tensor the model needs, every shape checked against config.json: one line naming the
    tensor and the file where something is missing, truncated, or of another shape."""
    index = folder / INDEX_FILE
    named = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else set()
    for file in sorted(named):
        if not (folder / file).is_file():
            raise DataError(f"{folder}: shard {file} (named by {INDEX_FILE}) is missing; download it again")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DataError(f"'{folder}' has no *.safetensors weights; save the model with safetensors")
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                    shapes[key] = (tuple(handle.get_slice(key).get_shape()), file)
        except (SafetensorError, OSError) as error:
            # a truncated download among them: safetensors checks the header against the file's size
            raise DataError(f"{file}: not a readable safetensors file ({error}); download it again") from None
    with torch.device("meta"):
        model = Transformer(TransformerConfig(**meta["model"]), head=meta["head"])
    wanted = {hf_name(name): tuple(param.shape) for name, param in model.named_parameters()}
    where = {}
    for key, shape in wanted.items():
        if key not in shapes:
            if key.startswith("score."):
                continue  # a reward model started from a language model: its head starts fresh
            raise DataError(f"{folder}: tensor {key} is in none of its *.safetensors files; the folder is "
                            "incomplete or holds another model")
        found, file = shapes[key]
        if found != shape:
            raise DataError(f"{file}: tensor {key} has shape {list(found)} but config.json's model needs "
                            f"{list(shape)}")
        where[key] = file
    extra = sorted(k for k in shapes if k not in wanted and not k.endswith(IGNORED)
                   and not (k == "lm_head.weight" and model.config.tie_embeddings))
    if extra:
        raise DataError(f"{shapes[extra[0]][1]}: tensor {extra[0]} is not part of a {model.config.family} model "
                        f"({len(extra)} such); raytrain refuses what its decoder would not compute")
    return where


@torch.no_grad()
def load_hf_weights(folder: Path, model: torch.nn.Module) -> dict:
    """The folder's weights into a model under any layout: each rank reads the slices of the tensors it holds."""
    meta, files = open_hf(folder)
    by_file: dict[Path, list[tuple[str, torch.Tensor]]] = {}
    for name, param in get_model_state_dict(model).items():
        key = hf_name(name)
        if key in files:
            by_file.setdefault(files[key], []).append((key, param))
    for file, tensors in by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            for key, param in tensors:
                slices, local = local_slices(param)
                local.copy_(handle.get_slice(key)[slices])
    return meta


def read_hf_tensor(folder: Path, name: str) -> torch.Tensor:
    """One of the model's tensors (our name) from a Hugging Face folder."""
    meta, files = open_hf(folder)
    key = hf_name(name)
    if key not in files:  # a tied head: the embedding's
        key = hf_name("embed_tokens.weight")
    with safe_open(str(files[key]), framework="pt") as handle:
        return handle.get_tensor(key)


class HFTensorReader(DefaultSavePlanner):
    """dcp.save's planner for a model on the meta device whose weights are in a Hugging Face folder: the plan
    (names, shapes, dtypes) comes from the meta tensors; each tensor's bytes are read from its safetensors file
    only when the writer asks for them (resolve_data), cast to the dtype planned, and are freed once written."""

    def __init__(self, sources: dict[str, tuple[Path, str]]) -> None:
        super().__init__()
        self.sources = sources  # our parameter name → (its file, its Hugging Face name)

    def resolve_data(self, write_item: WriteItem):
        # The state dict's flattened keys are "<its one top-level key>.<our parameter name>".
        source = self.sources.get(write_item.index.fqn.partition(".")[2])
        if source is None:  # a tensor the model holds itself (a fresh score head)
            return super().resolve_data(write_item)
        file, key = source
        with safe_open(str(file), framework="pt") as handle:  # opened per tensor: no mapping of a whole shard
            tensor = handle.get_tensor(key)
        return tensor.to(write_item.tensor_data.properties.dtype)  # as load_hf_weights' copy_ casts it


def hf_model_on_meta(folder: Path) -> tuple[Transformer, dict, HFTensorReader]:
    """The folder's model on the meta device, its meta and the planner that reads its tensors when they are
    written: `save_model(out, model, meta, planner)` converts it holding one tensor at a time. Everything is
    checked here (open_hf), before anything is written. A tied head reads the embedding (as load_hf_weights: the
    folder's lm_head.weight, if any, is not the model's); a score head the folder lacks starts fresh, with its
    module's own init, as it does when the folder loads."""
    meta, files = open_hf(folder)
    with torch.device("meta"):
        model = Transformer(TransformerConfig(**meta["model"]), head=meta["head"])
    first = {id(param): name for name, param in model.named_parameters()}  # a tied parameter: its first name
    sources = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        key = hf_name(first[id(param)])
        if key in files:
            sources[name] = (files[key], key)
        else:  # only a score head may be missing (tensor_files): tiny, made here
            module = model.get_submodule(name.rpartition(".")[0])
            module.to_empty(device="cpu")
            module.reset_parameters()
    return model, meta, HFTensorReader(sources)
