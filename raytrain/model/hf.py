"""Hugging Face interop: our parameter names are LlamaForCausalLM's, less the `model.` prefix.

A reward model (score head) is LlamaForSequenceClassification with one label: `score.weight` beside the
trunk, read at the last token that is not <|pad|> (pad_token_id), as our reward objective reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raytrain.errors import DataError
from raytrain.model.transformer import Transformer, TransformerConfig

HF_PREFIX = "model."


def hf_config(config: TransformerConfig, head: str = "lm") -> dict:
    classifier = {"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
                  "problem_type": "regression"} if head == "score" else {}
    return {
        **classifier,
        "architectures": ["LlamaForSequenceClassification" if head == "score" else "LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # Both spellings: transformers 4.x reads rope_theta, 5.x rope_parameters.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
    }


def config_from_hf(hf: dict, source: Path) -> TransformerConfig:
    if hf.get("model_type") not in ("llama", None) or hf.get("hidden_act", "silu") != "silu":
        raise DataError(f"{source}: model_type {hf.get('model_type')!r} is not a Llama-family model")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise DataError(f"{source}: rope scaling {rope or hf.get('rope_scaling')} is not supported yet")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim", hf["hidden_size"] // heads) * heads != hf["hidden_size"]:
        raise DataError(f"{source}: head_dim × heads must equal hidden_size")
    return TransformerConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads", heads),
        ffn_hidden=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


def save_hf(model: Transformer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        key = name if name.startswith(("lm_head.", "score.")) else HF_PREFIX + name
        tensors[key] = tensor.detach().contiguous().cpu()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    head = "score" if model.score is not None else "lm"
    (out / "config.json").write_text(json.dumps(hf_config(model.config, head), indent=2))


def load_hf(folder: Path) -> Transformer:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise DataError(f"'{folder}' has no config.json; point at a Hugging Face model folder")
    config = config_from_hf(json.loads(config_path.read_text()), config_path)
    tensors: dict[str, torch.Tensor] = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DataError(f"'{folder}' has no *.safetensors weights; save the model with safetensors")
    for file in files:
        tensors.update(load_file(file))
    state = {k.removeprefix(HF_PREFIX): v for k, v in tensors.items()}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model = Transformer(config)
    problems = model.load_state_dict(state, strict=False)
    if problems.missing_keys or problems.unexpected_keys:
        raise DataError(
            f"{folder}: weights do not match a Llama model (missing {problems.missing_keys[:4]}, "
            f"unexpected {problems.unexpected_keys[:4]})"
        )
    return model
