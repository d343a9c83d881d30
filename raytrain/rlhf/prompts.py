"""PPO's prompts: the built-in `stdlib-qa` questions, a verifiable task's (`task:NAME`), or JSONL records
holding a prompt.

A record gives `prompt` (text) or `messages` (turns ending with a user turn); both render through the one
chat format, ending with `<|assistant|>`. Prompts split into train and held-out by content (by package for
`stdlib-qa`, the same split its SFT and preference data use), so the held-out reward is measured on prompts
no earlier stage trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tokenizers import Tokenizer

from raytrain.data.chat import check_conversation
from raytrain.data.chat_data import STDLIB_QA
from raytrain.data.packing import is_val_document
from raytrain.data.sources import decode_utf8, filesystem_of, resolve_sources
from raytrain.data.stdlib_qa import is_val_module, stdlib_qa
from raytrain.errors import DataError
from raytrain.tasks import is_task_source, load_task


@dataclass(frozen=True)
class PromptSet:
    train: list[list[int]]  # token ids, each ending with <|assistant|>
    val: list[list[int]]

    @property
    def longest(self) -> int:
        return max(len(p) for p in self.train + self.val)


def load_prompts(source: str, tokenizer: Tokenizer, seed: int, val_fraction: float,
                 prompt_field: str = "prompt", messages_field: str = "messages") -> PromptSet:
    if source == STDLIB_QA:
        split = {(p.question, is_val_module(p.module, seed, val_fraction)) for p in stdlib_qa()}
        ordered = sorted(split)
    elif is_task_source(source):
        ordered = [(p.prompt, p.held_out) for p in load_task(source).problems()]  # the task's own split
    else:
        ordered = []
        for path, number, record in _records(source):
            where = f"{path}:{number}"
            if messages_field in record:
                turns = check_conversation(record[messages_field], where, ends_with_reply=False)
                if turns[-1]["role"] != "user":
                    raise DataError(f"{where}: the last turn is {turns[-1]['role']!r}; a prompt ends with a user "
                                    "turn that the policy answers")
                ordered.append((turns, is_val_document(json.dumps(turns), seed, val_fraction)))
                continue
            text = record.get(prompt_field)
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: no non-empty '{prompt_field}' or '{messages_field}' field (found: "
                                f"{', '.join(record) or 'none'}); give each record a prompt")
            ordered.append((text, is_val_document(text, seed, val_fraction)))
    train, val = [], []
    for prompt, held_out in ordered:
        ids = (tokenizer.encode_prompt(prompt) if isinstance(prompt, str)
               else tokenizer.encode_conversation(prompt, add_generation_prompt=True)[0])
        (val if held_out else train).append(ids)
    if not train:
        raise DataError(f"'{source}' holds no training prompts (all {len(val)} fell in the held-out split); "
                        "give more prompts or lower data.prepare.val_fraction")
    return PromptSet(train, val)


def _records(source: str):
    """(path, line number, record) of every JSONL record under `source`."""
    files = resolve_sources([source])
    if not files:
        raise DataError(f"'{source}' holds no files; pass '{STDLIB_QA}' or JSONL files of prompt records")
    for file in files:
        if file.kind != "jsonl":
            raise DataError(f"'{file.path}' is not JSONL; `raytrain ppo --prompts` reads JSONL records with a "
                            "'prompt' or 'messages' field, or 'stdlib-qa'")
        fs, path = filesystem_of(file.path)
        with fs.open_input_stream(path) as stream:
            text, _ = decode_utf8(stream.read())
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{file.path}:{number}: invalid JSON ({exc.msg} at column {exc.colno}); fix the "
                                "line") from None
            if not isinstance(record, dict):
                raise DataError(f"{file.path}:{number}: a record must be a JSON object, got "
                                f"{type(record).__name__}")
            yield file.path, number, record
