"""Tokenizers: raytrain's byte-level BPE (training, saving in the standard HF layout) and any Hugging Face
tokenizer folder, loaded as one Vocabulary."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from raytrain import storage
from raytrain.data.chat import CHAT_TEMPLATE, NativeChat
from raytrain.data.chat_template import TemplateChat
from raytrain.errors import DataError
from raytrain.vocabulary import SPECIAL_TOKENS

log = logging.getLogger("raytrain")
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    split_digits: bool = False) -> Tokenizer:
    """Train byte-level BPE: every byte is in the alphabet, so any string round-trips. split_digits: every digit
    is a token of its own (as Llama's and Qwen's tokenizers split them), so a number is read digit by digit."""
    tokenizer = Tokenizer(models.BPE())
    # No normalizer: the text is kept byte for byte.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                               if split_digits else byte_level)
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


HF_TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                      "chat_template.json")
# A missing pad token is taken from these when the tokenizer has them (Llama 3's own, ChatML's end of text, ...).
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|endoftext|>", "<pad>", "<|pad|>")


class Vocabulary:
    """A loaded tokenizer with what training needs of it: bos (may be None), eos, pad, the ids generation stops at,
    and its chat format: raytrain's own (data/chat.py) or a Hugging Face tokenizer's chat template
    (data/chat_template.py). Everything else (encode, decode, ...) is the `tokenizers.Tokenizer`'s."""

    def __init__(self, tokenizer: Tokenizer, folder: str, *, bos: int | None, eos: int, pad: int, chat,
                 native: bool, extra: dict[str, int | None]):
        self.tokenizer, self.folder, self.native, self.chat = tokenizer, folder, native, chat
        self.bos, self.eos, self.pad = bos, eos, pad
        end_of_turn = getattr(chat, "end_of_turn", None)
        self.stop_ids = tuple(dict.fromkeys(i for i in (eos, end_of_turn) if i is not None))
        self.special = {"bos": bos, "eos": eos, "pad": pad, **extra, "stop": list(self.stop_ids)}

    def __getattr__(self, name: str):
        if name.startswith("_") or name == "tokenizer":  # unpickling: not yet initialised
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def require_chat(self) -> None:
        if self.chat is None:
            raise DataError(f"the tokenizer in '{self.folder}' has no chat_template; add one to its "
                            "tokenizer_config.json (or chat_template.jinja) to train on conversations")

    def encode_conversation(self, turns, add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """(ids, trained): trained marks the assistant replies' tokens through their end of turn."""
        self.require_chat()
        return self.chat.encode(turns, add_generation_prompt)

    def encode_prompt(self, prompt: str, system: str | None = None) -> list[int]:
        """The ids that ask the model for an assistant reply to `prompt`."""
        turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.encode_conversation(turns, add_generation_prompt=True)[0]

    def document_ids(self, ids: list[int]) -> list[int]:
        """A pre-training document: its ids and eos (and bos first, for a tokenizer whose models expect it)."""
        return ([self.bos] if self.bos is not None and not self.native else []) + ids + [self.eos]

    def text_prompt(self, text: str) -> list[int]:
        """Plain text to continue, as a pre-training document starts (document_ids: bos first only for a tokenizer
        whose models expect it; raytrain's own models never saw one)."""
        return self.document_ids(self.tokenizer.encode(text, add_special_tokens=False).ids)[:-1]


def copy_tokenizer(folder: str | Path, out: Path) -> None:
    """The tokenizer's files into out, so a model folder is self-contained: AutoTokenizer loads it. raytrain's own
    get today's HF config files (with the chat template, also for older tokenizers); another keeps its own."""
    if load_tokenizer(folder).native:
        storage.write_text(out / TOKENIZER_FILE, storage.read_text(tokenizer_file(folder)))
        write_hf_tokenizer_config(out)
        return
    for name in HF_TOKENIZER_FILES:
        if storage.is_file(storage.join(folder, name)):
            storage.write_text(out / name, storage.read_text(storage.join(folder, name)))


def tokenizer_file(folder: str | Path) -> str:
    path = storage.join(folder, TOKENIZER_FILE)
    if not storage.is_file(path):
        raise DataError(
            f"no {TOKENIZER_FILE} in '{folder}'; train one with "
            f"`raytrain data tokenizer --input ... --out {folder}`, or point at a Hugging Face tokenizer folder"
        )
    return path


def load_tokenizer(folder: str | Path) -> Vocabulary:
    """Load for data work: text that spells a special token stays plain text (raytrain's chat format), or is
    refused (a chat template's, whose rendered text must parse its own special tokens)."""
    path = tokenizer_file(folder)
    tokenizer = Tokenizer.from_str(storage.read_text(path))
    if all(tokenizer.token_to_id(t) is not None for t in SPECIAL_TOKENS.values()):
        # Documents must not inject control tokens such as "<|eos|>" by spelling them.
        tokenizer.encode_special_tokens = True
        ids = {name: tokenizer.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
        extra = {k: v for k, v in ids.items() if k not in ("bos", "eos", "pad")}
        return Vocabulary(tokenizer, str(folder), bos=ids["bos"], eos=ids["eos"], pad=ids["pad"],
                          chat=NativeChat(tokenizer), native=True, extra=extra)
    return _hf_vocabulary(tokenizer, str(folder))


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: str) -> dict:
    try:
        return json.loads(storage.read_text(path)) if storage.is_file(path) else {}
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg}, line {exc.lineno}); fix the file") from None


def _chat_template(folder: str, settings: dict) -> str | None:
    template = settings.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and storage.is_file(storage.join(folder, "chat_template.jinja")):
        template = storage.read_text(storage.join(folder, "chat_template.jinja"))
    if template is None:
        template = _read_json(storage.join(folder, "chat_template.json")).get("chat_template")
    return template


def _hf_vocabulary(tokenizer: Tokenizer, folder: str) -> Vocabulary:
    config_path = storage.join(folder, "tokenizer_config.json")
    if not storage.is_file(config_path):
        raise DataError(f"'{folder}' has neither raytrain's special tokens nor a tokenizer_config.json; point at a "
                        "Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json) or train one with "
                        "`raytrain data tokenizer`")
    settings = {**_read_json(storage.join(folder, "special_tokens_map.json")), **_read_json(config_path)}
    names = {key: _token_text(settings.get(f"{key}_token")) for key in ("bos", "eos", "pad", "unk")}

    def token_id(key: str) -> int | None:
        text = names[key]
        if text is None:
            return None
        found = tokenizer.token_to_id(text)
        if found is None:
            raise DataError(f"{config_path}: {key}_token {text!r} is not in {TOKENIZER_FILE}; fix {key}_token")
        return found

    eos = token_id("eos")
    if eos is None:
        raise DataError(f"{config_path} names no eos_token; set eos_token to the token that ends a document")
    template = _chat_template(folder, settings)
    variables = {f"{k}_token": v for k, v in names.items() if v is not None}
    chat = TemplateChat(tokenizer, template, variables, folder) if template else None
    pad = token_id("pad")
    if pad is None or pad == eos or pad == getattr(chat, "end_of_turn", None):
        pad = _spare_pad(tokenizer, names, template or "", eos, chat, folder)
    return Vocabulary(tokenizer, folder, bos=token_id("bos"), eos=eos, pad=pad, chat=chat, native=False,
                      extra={"mask": None})


def _spare_pad(tokenizer: Tokenizer, names: dict, template: str, eos: int, chat, folder: str) -> int:
    """A pad token for a tokenizer without its own: one that ends nothing and that the template never writes
    (padding is told from text by its id, so it must not occur in a row)."""
    used = {eos, getattr(chat, "end_of_turn", None), tokenizer.token_to_id(names["bos"] or "")}
    added = [t.content for t in sorted(tokenizer.get_added_tokens_decoder().values(), key=lambda t: t.content)
             if t.special]
    for text in (*PAD_CANDIDATES, names["unk"], *added):
        found = tokenizer.token_to_id(text) if text else None
        if found is not None and found not in used and text not in template:
            log.info("%s: the tokenizer has no pad token of its own; padding with %r (id %d), which its chat "
                     "template never writes", folder, text, found)
            return found
    raise DataError(f"the tokenizer in '{folder}' has no pad token and no spare special token to pad with; add "
                    "pad_token to its tokenizer_config.json (a token the chat template never writes)")


def tokenizer_hash(folder: str | Path) -> str:
    return hashlib.sha256(storage.read_bytes(tokenizer_file(folder))).hexdigest()
