"""A raytrain checkpoint as a Hugging Face folder (safetensors + config.json of its family, and its tokenizer
beside: raytrain's own, or the imported model's files as they were)."""

from __future__ import annotations

import functools
from pathlib import Path

from raytrain import storage
from raytrain.data.tokenizer import TOKENIZER_FILE, copy_tokenizer, load_tokenizer
from raytrain.errors import DataError
from raytrain.model.hf import ARCHITECTURE, SHARD_BYTES, write_hf_folder
from raytrain.model.lora import is_adapter, peft_config, save_peft_adapter
from raytrain.model.transformer import TransformerConfig
from raytrain.train.checkpoint import model_head, read_checkpoint_meta, read_tensor, resolve_checkpoint, stored_keys
from raytrain.train.hf_checkpoint import hf_folder


def checkpoint_to_hf(checkpoint: str, out: str | Path, shard_bytes: int = SHARD_BYTES, merge: bool = False) -> str:
    """Writes the folder a tensor at a time (the peak is one tensor, not the model: read_tensor); returns what it
    wrote: the architecture ({Family}ForCausalLM, or a 1-label sequence classifier for a reward model), or a PEFT
    adapter for a LoRA run's checkpoint unless `merge` asks for its adapters folded into full weights."""
    storage.require_local(out, "--out of convert to-hf", "convert here, then upload the folder")
    folder = resolve_checkpoint(checkpoint)
    if hf_folder(folder) is not None:
        raise DataError(f"'{checkpoint}' is a Hugging Face folder already; transformers loads it as it is")
    meta = read_checkpoint_meta(folder)
    config, head = TransformerConfig(**meta["model"]), model_head(meta)
    out = Path(out)
    if "lora" in meta and not merge:
        return _peft_adapter(folder, meta, out)
    tokenizer_dir = meta["tokenizer"]["path"] if "tokenizer" in meta else None  # a folder or a URI
    special = None
    if tokenizer_dir and storage.is_file(storage.join(tokenizer_dir, TOKENIZER_FILE)):
        special = load_tokenizer(tokenizer_dir).special
        copy_tokenizer(tokenizer_dir, out)  # model and tokenizer in one folder: AutoModel and AutoTokenizer load it
    with storage.local_copy(folder) as local:
        write_hf_folder(out, config, head, functools.partial(read_tensor, local, meta), special, shard_bytes)
    name = ARCHITECTURE[config.family]
    return f"{name}ForSequenceClassification, 1 label" if head == "score" else f"{name}ForCausalLM"


def _peft_adapter(folder: str | Path, meta: dict, out: Path) -> str:
    """A LoRA run's adapters as the folder `peft.PeftModel.from_pretrained(base, out)` loads, the base being its
    base checkpoint converted with `convert to-hf` (or the Hugging Face folder it started from)."""
    if model_head(meta) != "lm":
        raise DataError("a LoRA reward model trains its score head whole beside the adapters; convert it with "
                        "--merge (full weights)")
    lora, prefix = meta["lora"], meta["weights_prefix"]
    with storage.local_copy(folder) as local:
        stored = stored_keys(local)
        adapters = {key.removeprefix(prefix): read_tensor(local, meta, key.removeprefix(prefix))
                    for key in sorted(stored) if key.startswith(prefix) and is_adapter(key)}
    base = hf_folder(lora["base"])
    save_peft_adapter(adapters, out, peft_config(lora["rank"], lora["alpha"], lora["dropout"],
                                                 tuple(lora["target_modules"]), str(base or lora["base"])))
    return (f"a PEFT LoRA adapter of rank {lora['rank']} on {len(adapters) // 2} layers; its base: "
            f"{lora['base']}" + ("" if base else " (convert it with `raytrain convert to-hf` for peft)"))
