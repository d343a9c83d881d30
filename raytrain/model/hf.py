"""Hugging Face interop for the families of model/config.py: our parameter names are transformers', less the
`model.` prefix, so a checkpoint converts by renaming nothing but the prefix.

A reward model (score head) is {Family}ForSequenceClassification with one label: `score.weight` beside the trunk,
read at the last token that is not the pad token (pad_token_id), as our reward objective reads it. What a family's
checkpoint may hold that our decoder does not compute is refused by name (`config_from_hf`), never dropped.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch

from raytrain.errors import DataError
from raytrain.model.transformer import Transformer, TransformerConfig

log = logging.getLogger("raytrain")
HF_PREFIX = "model."
INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
ARCHITECTURE = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}
# What each family computes beyond plain Llama: Qwen2 always biases q/k/v, Qwen3 always normalises q and k.
FAMILY_OPTIONS = {"llama": {}, "qwen2": {"attention_bias": True}, "qwen3": {"qk_norm": True}, "mistral": {}}
ROPE_KEYS = {"linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
             "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                      "truncate")}
ROPE_FIELDS = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
               "high_freq_factor": "rope_high_freq_factor", "original_max_position_embeddings": "rope_original_max_len",
               "beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow",
               "attention_factor": "rope_attention_factor", "truncate": "rope_truncate"}


def rope_parameters(config: TransformerConfig) -> dict:
    kind = "default" if config.rope_scaling == "none" else config.rope_scaling
    params = {"rope_type": kind, "rope_theta": config.rope_theta}
    for key in ROPE_KEYS.get(kind, ()):
        value = getattr(config, ROPE_FIELDS[key])
        if key != "attention_factor" or value:  # 0: transformers' own default
            params[key] = value
    return params


def hf_config(config: TransformerConfig, head: str = "lm", special: dict | None = None) -> dict:
    """config.json for transformers; special: the tokenizer's bos/eos/pad ids (raytrain's by default)."""
    special = special or {"bos": 0, "eos": 1, "pad": 2}
    name = ARCHITECTURE[config.family]
    classifier = {"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
                  "problem_type": "regression"} if head == "score" else {}
    rope = rope_parameters(config)
    family = {"llama": {"attention_bias": False, "mlp_bias": False},
              "qwen2": {"use_sliding_window": False}, "qwen3": {"attention_bias": False, "use_sliding_window": False},
              "mistral": {"sliding_window": config.sliding_window or None}}[config.family]
    return {
        **classifier,
        "architectures": [f"{name}ForSequenceClassification" if head == "score" else f"{name}ForCausalLM"],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # Both spellings: transformers 4.x reads rope_theta and rope_scaling, 5.x rope_parameters.
        "rope_theta": config.rope_theta,
        "rope_scaling": None if rope["rope_type"] == "default" else
        {k: v for k, v in rope.items() if k != "rope_theta"},
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        **family,
        "torch_dtype": "float32",
        "bos_token_id": special.get("bos"),
        "eos_token_id": special.get("eos"),
        "pad_token_id": special.get("pad"),
    }


def _refuse(source: Path, what: str, why: str) -> None:
    raise DataError(f"{source}: {what} is not supported: {why}")


def _rope_from_hf(hf: dict, source: Path) -> dict:
    """Our rope fields from either spelling (rope_parameters, or rope_theta + rope_scaling with type/rope_type)."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta") or 10000.0))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        _refuse(source, "partial_rotary_factor", "rotary positions over part of each head are not implemented")
    if kind == "default":
        return {"rope_theta": theta}
    if kind not in ROPE_KEYS:
        _refuse(source, f"rope type {kind!r}", f"raytrain implements {', '.join(['default', *ROPE_KEYS])}")
    if kind == "yarn" and (params.get("mscale") or params.get("mscale_all_dim")):
        _refuse(source, "yarn's mscale/mscale_all_dim", "DeepSeek's attention-scale variant is not implemented")
    fields = {"rope_theta": theta, "rope_scaling": kind}
    for key in ROPE_KEYS[kind]:
        if params.get(key) is not None:
            fields[ROPE_FIELDS[key]] = type(getattr(TransformerConfig, ROPE_FIELDS[key]))(params[key])
    if kind == "yarn" and "rope_original_max_len" not in fields:
        fields["rope_original_max_len"] = hf["max_position_embeddings"]
    return fields


def _sliding_window(hf: dict, family: str) -> int:
    """The window the checkpoint's attention uses (0: none)."""
    window = hf.get("sliding_window") or 0
    if family == "mistral":
        return window
    if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        return window if "sliding_attention" in (hf.get("layer_types") or ["sliding_attention"]) else 0
    return 0


def config_from_hf(hf: dict, source: Path) -> TransformerConfig:
    family = hf.get("model_type", "llama")
    if family not in ARCHITECTURE:
        _refuse(source, f"model_type {family!r}", f"raytrain imports {', '.join(ARCHITECTURE)}")
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(source, f"hidden_act {hf['hidden_act']!r}", "the MLP is SwiGLU (silu)")
    if hf.get("mlp_bias"):
        _refuse(source, "mlp_bias", "the MLP projections have no biases")
    if hf.get("attention_bias") and family in ("llama", "qwen3", "mistral"):
        _refuse(source, f"attention_bias with {family}", "it biases o_proj too; only Qwen2's q/k/v biases are "
                "implemented")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    max_len = hf.get("max_position_embeddings", 2048)
    window = _sliding_window(hf, family)
    if window and window < max_len:
        # Within the window, sliding-window attention is plain causal attention: cap the length there.
        log.warning("%s: attention slides over %d tokens; model.max_seq_len is capped at %d (of %d) so every "
                    "position sees what the checkpoint's attention sees", source, window, window, max_len)
        max_len = window
    return TransformerConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_hidden=hf["intermediate_size"],
        max_seq_len=max_len,
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        family=family,
        head_size=0 if head_dim * heads == hf["hidden_size"] else head_dim,
        sliding_window=window,
        **FAMILY_OPTIONS[family],
        **_rope_from_hf(hf, source),
    )


def hf_name(name: str) -> str:
    """Our parameter name → transformers' (the trunk's under `model.`)."""
    return name if name.startswith(("lm_head.", "score.")) else HF_PREFIX + name


def save_hf(model: Transformer, out: Path, special: dict | None = None, shard_bytes: int = SHARD_BYTES) -> None:
    """A model in memory as a Hugging Face folder."""
    state = model.state_dict()
    head = "score" if model.score is not None else "lm"
    write_hf_folder(out, model.config, head, lambda name: state[name].detach().cpu(), special, shard_bytes)


def write_hf_folder(out: Path, config: TransformerConfig, head: str, read: Callable[[str], torch.Tensor],
                    special: dict | None = None, shard_bytes: int = SHARD_BYTES) -> None:
    """config.json and the weights as safetensors files of at most shard_bytes each (model.safetensors when one
    is enough, else model-0000i-of-0000n.safetensors with model.safetensors.index.json), written a tensor at a
    time: `read(name)` gives one of our parameters, which is written and freed, so the peak is one tensor."""
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {name: (tuple(t.shape), t.dtype) for name, t in Transformer(config, head).state_dict().items()
                  if not (name == "lm_head.weight" and config.tie_embeddings)}
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file, names in zip(files, shards, strict=True):
        _write_safetensors(out / file, [(hf_name(n), *shapes[n]) for n in names], (read(n) for n in names))
    if len(files) > 1:
        total = sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {hf_name(n): file for file, names in zip(files, shards, strict=True) for n in names}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config(config, head, special), indent=2))


def _write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]], tensors) -> None:
    """The safetensors format written directly: the header (names, dtypes, shapes, offsets: all known from the
    shapes) first, then each tensor's bytes as `tensors` yields it."""
    header, offset = {}, 0
    for key, shape, dtype in entries:
        end = offset + math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(len(blob).to_bytes(8, "little"))
        file.write(blob)
        for (key, shape, dtype), tensor in zip(entries, tensors, strict=True):
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise ValueError(f"{key}: got {tuple(tensor.shape)} {tensor.dtype}, expected {shape} {dtype}")
            file.write(tensor.contiguous().view(torch.uint8).numpy().data)
