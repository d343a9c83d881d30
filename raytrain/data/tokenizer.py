"""Byte-level BPE tokenizer: training, saving in the standard HF layout, loading."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from raytrain import storage
from raytrain.data.chat import CHAT_TEMPLATE
from raytrain.errors import DataError
from raytrain.vocabulary import SPECIAL_TOKENS

TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE: every byte is in the alphabet, so any string round-trips."""
    tokenizer = Tokenizer(models.BPE())
    # No normalizer: the text is kept byte for byte.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out: str | Path, metadata: dict) -> None:
    """Write tokenizer.json plus the config files `transformers.AutoTokenizer` reads (out: a folder or URI)."""
    storage.write_text(storage.join(out, TOKENIZER_FILE), tokenizer.to_str(pretty=True))
    write_hf_tokenizer_config(out)
    storage.write_text(storage.join(out, "raytrain_tokenizer.json"), json.dumps(metadata, indent=2))


def write_hf_tokenizer_config(out: str | Path) -> None:
    """special_tokens_map.json and tokenizer_config.json, with the chat template, beside tokenizer.json."""
    special_map = {
        "bos_token": SPECIAL_TOKENS["bos"],
        "eos_token": SPECIAL_TOKENS["eos"],
        "pad_token": SPECIAL_TOKENS["pad"],
        "mask_token": SPECIAL_TOKENS["mask"],
        "additional_special_tokens": [
            SPECIAL_TOKENS[k] for k in ("system", "user", "assistant")
        ],
    }
    hf_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1 << 30,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        **special_map,
    }
    storage.write_text(storage.join(out, "special_tokens_map.json"), json.dumps(special_map, indent=2))
    storage.write_text(storage.join(out, "tokenizer_config.json"), json.dumps(hf_config, indent=2))


def copy_tokenizer(folder: str | Path, out: Path) -> None:
    """tokenizer.json and today's HF config files (with the chat template, also for older tokenizers) into out,
    so a model folder is self-contained: AutoTokenizer loads it."""
    storage.write_text(out / TOKENIZER_FILE, storage.read_text(tokenizer_file(folder)))
    write_hf_tokenizer_config(out)


def tokenizer_file(folder: str | Path) -> str:
    path = storage.join(folder, TOKENIZER_FILE)
    if not storage.is_file(path):
        raise DataError(
            f"no {TOKENIZER_FILE} in '{folder}'; train one with "
            f"`raytrain data tokenizer --input ... --out {folder}`"
        )
    return path


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load for data work: text that spells a special token stays plain text."""
    path = tokenizer_file(folder)
    tokenizer = Tokenizer.from_str(storage.read_text(path))
    # Documents must not inject control tokens such as "<|eos|>" by spelling them.
    tokenizer.encode_special_tokens = True
    missing = [t for t in SPECIAL_TOKENS.values() if tokenizer.token_to_id(t) is None]
    if missing:
        raise DataError(f"{path} lacks special tokens {missing}; retrain it with raytrain")
    return tokenizer


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    return {name: tokenizer.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}


def tokenizer_hash(folder: str | Path) -> str:
    return hashlib.sha256(storage.read_bytes(tokenizer_file(folder))).hexdigest()
