"""Random-weight models of each open family, built by transformers from its own config class (no downloads):
shared by the family tests and the imported-model chain test."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 320
SHAPE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
# Each family with what its real checkpoints use: Llama 3.1/3.2's llama3 rope scaling, Qwen2.5's q/k/v biases and
# tied embeddings with yarn, Qwen3's q/k norms and a head size apart from hidden / heads, Mistral's sliding window
# with linear scaling.
FAMILIES = {
    "llama": ("LlamaConfig", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32}}),
    "qwen3": ("Qwen3Config", {"head_dim": 32, "tie_word_embeddings": True,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "mistral": ("MistralConfig", {"sliding_window": 64, "head_dim": 16, "rope_parameters": {
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
}


def hf_model(family: str, seed: int = 0):
    """A transformers model of the family whose every weight is random (biases and norm weights too, so a
    missing bias or q/k norm shows in the logits)."""
    import transformers

    class_name, options = FAMILIES[family]
    config = getattr(transformers, class_name)(**SHAPE, **options)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                param.copy_(torch.randn_like(param) * 0.1 + (0.0 if name.endswith("bias") else 1.0))
    return model


def save_family(family: str, folder: Path, seed: int = 0):
    model = hf_model(family, seed)
    model.save_pretrained(folder)
    return model
