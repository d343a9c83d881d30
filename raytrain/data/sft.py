"""`raytrain data sft`: conversations → rows of tokens with a loss mask → Parquet shards (Ray Data).

Sources: JSONL or Parquet records with a prompt and a response (`data.chat.prompt_field`,
`response_field`) or a list of messages (`data.chat.messages_field`), and the built-in `stdlib-qa`.
Each example becomes one row of seq_len + 1 tokens in the chat format (`raytrain.data.chat`), padded
with <|pad|>; `loss_mask` marks the tokens the model learns to produce: assistant replies and their
<|eos|>. A conversation longer than the row loses tokens from the left while its last reply survives
(counted as truncated); otherwise it is dropped (counted by reason). The split is by a hash of the
conversation, or for `stdlib-qa` by package, so its val questions come from unseen modules.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
from ray.data import ActorPoolStrategy

from raytrain.config import ChatDataConfig, Config
from raytrain.data.chat import check_conversation, encode_conversation
from raytrain.data.manifest import MANIFEST_FILE, SPLITS
from raytrain.data.output import atomic_output_dir
from raytrain.data.packing import TOKEN_DTYPE, is_val_document, rows_per_row_group
from raytrain.data.prepare import ShardDatasink, dataset_manifest, row_output, tokenize_actor_count, write_shard
from raytrain.data.sources import resolve_sources
from raytrain.data.stdlib_qa import STDLIB_QA, is_val_module, stdlib_qa
from raytrain.data.tokenizer import load_tokenizer, special_token_ids
from raytrain.errors import DataError
from raytrain.runtime import init_ray

log = logging.getLogger("raytrain")
MASK_DTYPE = np.uint8


def record_conversation(record: dict, where: str, fields: ChatDataConfig) -> list[dict[str, str]]:
    """A record's conversation (checked), or a DataError naming `where` and the fix."""
    if fields.messages_field in record:
        return check_conversation(record[fields.messages_field], where, ends_with_reply=True)
    if fields.prompt_field not in record and fields.response_field not in record:
        found = ", ".join(record) or "none"
        raise DataError(f"{where}: no '{fields.messages_field}' and no '{fields.prompt_field}'/"
                        f"'{fields.response_field}' fields (found: {found}); set --prompt-field and "
                        "--response-field, or --messages-field")
    for name in (fields.prompt_field, fields.response_field):
        value = record.get(name)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field '{name}' is missing or empty; give it non-empty text or drop the record")
    return [{"role": "user", "content": record[fields.prompt_field]},
            {"role": "assistant", "content": record[fields.response_field]}]


def _conversations_table(rows: list[tuple[list, str, bool | None]]) -> pa.Table:
    return pa.table({
        "messages": pa.array([json.dumps(turns, ensure_ascii=False) for turns, _, _ in rows], pa.large_string()),
        "where": pa.array([where for _, where, _ in rows], pa.string()),
        "val": pa.array([val for _, _, val in rows], pa.bool_()),  # None: decided by hash
    })


class _ParseChatJsonl:
    def __init__(self, fields: ChatDataConfig):
        self.fields = fields

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for data, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist(), strict=True):
            for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); fix the line") from None
                if not isinstance(record, dict):
                    raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
                rows.append((record_conversation(record, where, self.fields), where, None))
        return _conversations_table(rows)


class _ParquetChats:
    def __init__(self, fields: ChatDataConfig):
        self.fields = fields

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = batch.drop_columns(["path"]).to_pylist()
        paths = batch.column("path").to_pylist()
        rows = [(record_conversation(r, f"{p}, record {json.dumps(r, default=str)[:60]}…", self.fields), p, None)
                for r, p in zip(records, paths, strict=True)]
        return _conversations_table(rows)


def read_conversations(inputs: list[str], fields: ChatDataConfig, seed: int, val_fraction: float):
    """A Ray Data dataset of conversations (`messages` JSON, `where`, `val`) from files and `stdlib-qa`."""
    import ray.data

    parts = []
    if STDLIB_QA in inputs:
        pairs = stdlib_qa()
        parts.append(ray.data.from_arrow(_conversations_table(
            [(p.messages(), f"{STDLIB_QA}:{p.module}:{p.kind}", is_val_module(p.module, seed, val_fraction))
             for p in pairs])))
    files = resolve_sources([i for i in inputs if i != STDLIB_QA]) if set(inputs) - {STDLIB_QA} else []
    text = [f.path for f in files if f.kind in ("text", "other")]
    if text:
        raise DataError(f"'{text[0]}' is not a JSONL or Parquet file of records; fine-tuning data needs "
                        f"'{fields.prompt_field}'/'{fields.response_field}' or '{fields.messages_field}' records "
                        "(plain text is for `raytrain data prepare`)")
    jsonl = [f.path for f in files if f.kind == "jsonl"]
    parquet = [f.path for f in files if f.kind == "parquet"]
    if jsonl:
        parts.append(ray.data.read_binary_files(jsonl, include_paths=True)
                     .map_batches(_ParseChatJsonl(fields), batch_format="pyarrow", batch_size=1))
    if parquet:
        parts.append(ray.data.read_parquet(parquet, include_paths=True)
                     .map_batches(_ParquetChats(fields), batch_format="pyarrow"))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def fit_row(ids: list[int], trained: list[bool], row_len: int, assistant_id: int) -> tuple[str, int]:
    """("" or "truncated", first kept index) when the conversation fits the row, or (drop reason, -1).

    Tokens are cut from the left; the last reply, from its <|assistant|> token on, must survive."""
    if not any(trained):
        return "no_reply", -1
    if len(ids) <= row_len:
        return "", 0
    start = len(ids) - row_len
    last_reply = len(ids) - 1 - ids[::-1].index(assistant_id)
    return ("truncated", start) if start <= last_reply else ("reply_longer_than_row", -1)


class TokenizeConversations:
    """Actor: conversations → padded token rows, loss masks, and what became of each example."""

    def __init__(self, tokenizer_dir: str, row_len: int, seed: int, val_fraction: float):
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.special = special_token_ids(self.tokenizer)
        self.row_len = row_len
        self.seed = seed
        self.val_fraction = val_fraction

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        tokens = np.full((n, self.row_len), self.special["pad"], TOKEN_DTYPE)
        mask = np.zeros((n, self.row_len), MASK_DTYPE)
        status, split_val = [], []
        for i, (messages, val) in enumerate(zip(batch.column("messages").to_pylist(),
                                                batch.column("val").to_pylist(), strict=True)):
            ids, trained = encode_conversation(self.tokenizer, json.loads(messages))
            outcome, start = fit_row(ids, trained, self.row_len, self.special["assistant"])
            status.append(outcome)
            split_val.append(is_val_document(messages, self.seed, self.val_fraction) if val is None else val)
            if start >= 0:
                tokens[i, : len(ids) - start] = ids[start:]
                mask[i, : len(ids) - start] = trained[start:]
        return pa.table({
            "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), self.row_len),
            "loss_mask": pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), self.row_len),
            "status": status,
            "val": split_val,
        })


class ChatShardDatasink(ShardDatasink):
    """Each write task writes its kept examples, in order, as one shard per split."""

    def write(self, blocks, ctx) -> dict:
        columns: dict[str, dict[str, list[np.ndarray]]] = {s: {"tokens": [], "loss_mask": []} for s in SPLITS}
        counts: Counter[str] = Counter()
        for table in blocks:
            status = table.column("status").to_pylist()
            val = np.array(table.column("val").to_pylist(), bool)
            tokens = table.column("tokens").combine_chunks().flatten().to_numpy().reshape(-1, self.row_len)
            mask = table.column("loss_mask").combine_chunks().flatten().to_numpy().reshape(-1, self.row_len)
            counts.update(f"dropped_{s}" if s not in ("", "truncated") else s or "fitted" for s in status)
            kept = np.array([s in ("", "truncated") for s in status], bool)
            for split, chosen in (("train", kept & ~val), ("val", kept & val)):
                columns[split]["tokens"].append(tokens[chosen])
                columns[split]["loss_mask"].append(mask[chosen])
                counts[f"{split}_trained_tokens"] += int(mask[chosen].sum())
        result = {"task": ctx.task_idx, "counts": dict(counts), "shards": {}}
        for split in SPLITS:
            rows = {name: np.concatenate(parts) for name, parts in columns[split].items()}
            if len(rows["tokens"]):
                name = f"{split}/shard-{ctx.task_idx:06d}.parquet"
                write_shard(self.out / name, rows)
                result["shards"][split] = {"path": name, "rows": len(rows["tokens"])}
        return result


def run_sft_data_stage(config: Config) -> Path:
    prep = config.data.prepare
    out, tokenizer_dir = row_output(prep)
    row_len = prep.seq_len + 1
    inputs = config.data.source.inputs
    with atomic_output_dir(out, MANIFEST_FILE, prep.overwrite) as tmp:
        init_ray(config.runtime)
        start = time.perf_counter()
        log.info("data sft: %s → %s", ", ".join(inputs), out)
        conversations = read_conversations(inputs, config.data.chat, prep.seed, prep.val_fraction)
        tokenized = conversations.map_batches(
            TokenizeConversations, fn_constructor_args=(tokenizer_dir, row_len, prep.seed, prep.val_fraction),
            compute=ActorPoolStrategy(min_size=1, max_size=tokenize_actor_count(prep)), batch_size=prep.docs_per_batch,
            batch_format="pyarrow")
        sink = ChatShardDatasink(tmp, row_len, int(prep.shard_mib * 2**20))
        tokenized.write_datasink(sink)
        manifest = _finish(tmp, sink, config, tokenizer_dir, time.perf_counter() - start)
    examples, train, val = manifest["examples"], manifest["splits"]["train"], manifest["splits"]["val"]
    log.info("data sft: %d examples (%d truncated, %d dropped %s) → train %d / val %d rows of %d tokens, "
             "%d / %d answer tokens, in %.1fs → %s", examples["read"], examples["truncated"], examples["dropped"],
             examples["dropped_by_reason"] or "", train["rows"], val["rows"], row_len, train["trained_tokens"],
             val["trained_tokens"], manifest["seconds"], out)
    return out


def _finish(tmp: Path, sink: ChatShardDatasink, config: Config, tokenizer_dir: str, seconds: float) -> dict:
    counts = sink.counts()
    splits = {}
    for split in SPLITS:
        shards = sink.shards(split)
        splits[split] = {"rows": sum(s["rows"] for s in shards), "trained_tokens": counts[f"{split}_trained_tokens"],
                         "rows_per_row_group": rows_per_row_group(sink.row_len), "shards": shards}
    dropped = {k.removeprefix("dropped_"): v for k, v in counts.items() if k.startswith("dropped_")}
    read = counts["fitted"] + counts["truncated"] + sum(dropped.values())
    if splits["train"]["rows"] == 0:
        raise DataError(f"no training example fits: {read} read, dropped {dropped or 'none'}; raise --seq-len or "
                        "add examples")
    extra = {"kind": "sft", "columns": ["tokens", "loss_mask"],
             "examples": {"read": read, "truncated": counts["truncated"], "dropped": sum(dropped.values()),
                          "dropped_by_reason": dropped},
             "splits": splits, "config": {"source": vars(config.data.source), "prepare": vars(config.data.prepare),
                                          "chat": vars(config.data.chat)}}
    manifest = dataset_manifest(config, tokenizer_dir, seconds, extra)
    config.save(tmp / "config.yaml")
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))  # written last: the dataset is complete
    return manifest
