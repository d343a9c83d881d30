"""A raytrain checkpoint as a Hugging Face folder (safetensors + config.json, and its tokenizer beside)."""

from __future__ import annotations

from pathlib import Path

from raytrain import storage
from raytrain.data.tokenizer import TOKENIZER_FILE, copy_tokenizer
from raytrain.model.hf import save_hf
from raytrain.train.checkpoint import load_model


def checkpoint_to_hf(checkpoint: str, out: str | Path) -> str:
    """Writes the folder; returns the architecture written (LlamaForCausalLM, or a 1-label sequence classifier for
    a reward model)."""
    storage.require_local(out, "--out of convert to-hf", "convert here, then upload the folder")
    model, meta = load_model(checkpoint)
    out = Path(out)
    save_hf(model, out)
    tokenizer_dir = meta["tokenizer"]["path"] if "tokenizer" in meta else None  # a folder or a URI
    if tokenizer_dir and storage.is_file(storage.join(tokenizer_dir, TOKENIZER_FILE)):
        copy_tokenizer(tokenizer_dir, out)  # model and tokenizer in one folder: AutoModel and AutoTokenizer load it
    return "LlamaForSequenceClassification, 1 label" if model.score is not None else "LlamaForCausalLM"
