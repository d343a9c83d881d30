"""A raytrain checkpoint as a Hugging Face folder (safetensors + config.json of its family, and its tokenizer
beside: raytrain's own, or the imported model's files as they were)."""

from __future__ import annotations

import functools
from pathlib import Path

from raytrain import storage
from raytrain.data.tokenizer import TOKENIZER_FILE, copy_tokenizer, load_tokenizer
from raytrain.errors import DataError
from raytrain.model.hf import ARCHITECTURE, SHARD_BYTES, write_hf_folder
from raytrain.model.transformer import TransformerConfig
from raytrain.train.checkpoint import model_head, read_checkpoint_meta, read_tensor, resolve_checkpoint
from raytrain.train.hf_checkpoint import hf_folder


def checkpoint_to_hf(checkpoint: str, out: str | Path, shard_bytes: int = SHARD_BYTES) -> str:
    """Writes the folder a tensor at a time (the peak is one tensor, not the model: read_tensor); returns the
    architecture written ({Family}ForCausalLM, or a 1-label sequence classifier for a reward model)."""
    storage.require_local(out, "--out of convert to-hf", "convert here, then upload the folder")
    folder = resolve_checkpoint(checkpoint)
    if hf_folder(folder) is not None:
        raise DataError(f"'{checkpoint}' is a Hugging Face folder already; transformers loads it as it is")
    meta = read_checkpoint_meta(folder)
    config, head = TransformerConfig(**meta["model"]), model_head(meta)
    out = Path(out)
    tokenizer_dir = meta["tokenizer"]["path"] if "tokenizer" in meta else None  # a folder or a URI
    special = None
    if tokenizer_dir and storage.is_file(storage.join(tokenizer_dir, TOKENIZER_FILE)):
        special = load_tokenizer(tokenizer_dir).special
        copy_tokenizer(tokenizer_dir, out)  # model and tokenizer in one folder: AutoModel and AutoTokenizer load it
    with storage.local_copy(folder) as local:
        write_hf_folder(out, config, head, functools.partial(read_tensor, local, meta), special, shard_bytes)
    name = ARCHITECTURE[config.family]
    return f"{name}ForSequenceClassification, 1 label" if head == "score" else f"{name}ForCausalLM"
