"""A raytrain checkpoint as a Hugging Face folder (safetensors + config.json of its family, and its tokenizer
beside: raytrain's own, or the imported model's files as they were)."""

from __future__ import annotations

from pathlib import Path

from raytrain import storage
from raytrain.data.tokenizer import TOKENIZER_FILE, copy_tokenizer, load_tokenizer
from raytrain.model.hf import ARCHITECTURE, save_hf
from raytrain.train.checkpoint import load_model


def checkpoint_to_hf(checkpoint: str, out: str | Path) -> str:
    """Writes the folder; returns the architecture written ({Family}ForCausalLM, or a 1-label sequence classifier
    for a reward model)."""
    storage.require_local(out, "--out of convert to-hf", "convert here, then upload the folder")
    model, meta = load_model(checkpoint)
    out = Path(out)
    tokenizer_dir = meta["tokenizer"]["path"] if "tokenizer" in meta else None  # a folder or a URI
    special = None
    if tokenizer_dir and storage.is_file(storage.join(tokenizer_dir, TOKENIZER_FILE)):
        special = load_tokenizer(tokenizer_dir).special
        copy_tokenizer(tokenizer_dir, out)  # model and tokenizer in one folder: AutoModel and AutoTokenizer load it
    save_hf(model, out, special)
    name = ARCHITECTURE[model.config.family]
    return f"{name}ForSequenceClassification, 1 label" if model.score is not None else f"{name}ForCausalLM"
