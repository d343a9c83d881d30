"""`raytrain data sft`, `raytrain data prefs` and `raytrain data kto`: records → chat rows → Parquet shards (Ray Data).

Read (JSONL/Parquet records, or a built-in set) → check each record, naming `file:line` → tokenize in an
actor pool → one shard per split and write task; the manifest is written last and the folder renamed into
place when complete. Every conversation is rendered by the tokenizer's chat format (raytrain's own, or a Hugging
Face tokenizer's chat template) into a row padded with its pad token: seq_len + 1 tokens for sft (inputs and
shifted targets), seq_len for prefs (the sequence a reward model reads whole). One that is too long loses tokens
from the left while its last reply survives (counted as truncated); otherwise the example is dropped (counted by
reason). The split is by a hash of the example, or for the built-in sets by package, so their val questions come
from modules never trained on.

  sft    one conversation per example → `tokens` and `loss_mask` (the assistant tokens through their end of turn)
  prefs  a prompt's responses ranked best first → `response_0` … `response_{K-1}`, every pair (i < j) a
         preference of i over j (K responses give K(K−1)/2 pairs, all in one row, so in one batch); a
         plain chosen/rejected record is a ranking of two; `reply_mask_0` … `reply_mask_{K-1}` mark each
         response's reply tokens (what DPO sums log-probabilities over)
  kto    one completion per example, labelled desirable or not (TRL's unpaired format) → sft's two columns,
         `kl_tokens`/`kl_mask` (the example's prompt with the next example's completion in its tokenize batch:
         the mismatched pair KTO's reference point is estimated on) and `label` (1: desirable; the whole row)
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from ray.data import ActorPoolStrategy

from raytrain import storage
from raytrain.config import ChatDataConfig, Config
from raytrain.data.chat import check_conversation
from raytrain.data.manifest import MANIFEST_FILE, SPLITS
from raytrain.data.output import atomic_output_dir
from raytrain.data.packing import TOKEN_DTYPE, is_val_document, rows_per_row_group
from raytrain.data.prepare import ShardDatasink, dataset_manifest, row_output, tokenize_actor_count, write_shard
from raytrain.data.sources import resolve_sources
from raytrain.data.stdlib_qa import STDLIB_KTO, STDLIB_PREFS, STDLIB_QA, is_val_module, stdlib_prefs, stdlib_qa
from raytrain.data.tokenizer import load_tokenizer
from raytrain.errors import DataError
from raytrain.runtime import init_ray, native_noise_hidden
from raytrain.tasks import is_task_source, load_task

log = logging.getLogger("raytrain")
Conversation = list[dict[str, str]]


def user_turn(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def reply(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _text(record: dict, name: str, where: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field '{name}' is missing or empty; give it non-empty text or drop the record")
    return value


def sft_example(record: dict, where: str, fields: ChatDataConfig) -> list[Conversation]:
    """[the record's conversation], checked; or a DataError naming `where` and the fix."""
    if fields.messages_field in record:
        return [check_conversation(record[fields.messages_field], where, ends_with_reply=True)]
    if fields.prompt_field not in record and fields.response_field not in record:
        raise DataError(f"{where}: no '{fields.messages_field}' and no '{fields.prompt_field}'/"
                        f"'{fields.response_field}' fields (found: {', '.join(record) or 'none'}); set "
                        "--prompt-field and --response-field, or --messages-field")
    prompt, response = _text(record, fields.prompt_field, where), _text(record, fields.response_field, where)
    return [[user_turn(prompt), reply(response)]]


def kto_example(record: dict, where: str, fields: ChatDataConfig) -> list[Conversation]:
    """[the prompt and its completion], or a conversation of messages whose last turn is the completion."""
    if fields.messages_field in record:
        return [check_conversation(record[fields.messages_field], where, ends_with_reply=True)]
    return [[user_turn(_text(record, fields.prompt_field, where)),
             reply(_text(record, fields.completion_field, where))]]


def kto_label(record: dict, where: str, fields: ChatDataConfig) -> int:
    """1 for a desirable completion, 0 for an undesirable one."""
    value = record.get(fields.label_field)
    if not isinstance(value, bool) and value not in (0, 1):
        found = "missing" if value is None else f"{value!r}"
        raise DataError(f"{where}: field '{fields.label_field}' is {found}; KTO needs each completion labelled "
                        "true (desirable) or false (undesirable) (set --label-field if it is named otherwise)")
    return int(value)


def prefs_example(record: dict, where: str, fields: ChatDataConfig) -> list[Conversation]:
    """The record's prompt with each response, best first: chosen then rejected, or in ranking order."""
    prompt = _text(record, fields.prompt_field, where)
    if fields.responses_field in record:
        responses, ranking = record[fields.responses_field], record.get(fields.ranking_field)
        if not isinstance(responses, list) or len(responses) < 2:
            raise DataError(f"{where}: '{fields.responses_field}' must list at least two responses")
        empty = [i for i, r in enumerate(responses) if not isinstance(r, str) or not r.strip()]
        if empty:
            raise DataError(f"{where}: response {empty[0]} in '{fields.responses_field}' is empty or not text")
        texts = responses
        if not isinstance(ranking, list) or sorted(map(str, ranking)) != sorted(map(str, range(len(texts)))):
            raise DataError(f"{where}: '{fields.ranking_field}' {ranking!r} is not a permutation of the response "
                            f"indices 0..{len(texts) - 1}; list every response's index once, best first")
        ordered = [texts[int(i)] for i in ranking]
    else:
        ordered = [_text(record, fields.chosen_field, where), _text(record, fields.rejected_field, where)]
    if len(set(ordered)) < len(ordered):
        raise DataError(f"{where}: two responses are identical (chosen = rejected); a preference needs different "
                        "answers")
    return [[user_turn(prompt), reply(text)] for text in ordered]


# An example: its conversations, its split if fixed (None: by hash), its kind, its label (KTO's; None elsewhere).
Example = tuple[list[Conversation], bool | None, str, int | None]


@dataclass(frozen=True)
class Builtin:
    name: str
    examples: Callable[[int, float], list[Example]]  # seed, val_fraction


def stdlib_qa_examples(seed: int, val_fraction: float) -> list[Example]:
    return [([[user_turn(p.question), reply(p.answer)]], is_val_module(p.module, seed, val_fraction), p.kind, None)
            for p in stdlib_qa()]


def stdlib_prefs_examples(seed: int, val_fraction: float) -> list[Example]:
    return [([[user_turn(p.prompt), reply(p.chosen)], [user_turn(p.prompt), reply(p.rejected)]],
             is_val_module(p.module, seed, val_fraction), p.kind, None) for p in stdlib_prefs()]


def stdlib_kto_examples(seed: int, val_fraction: float) -> list[Example]:
    """stdlib-prefs unpaired, as TRL unpairs preference data for KTO: the chosen answer desirable, the rejected
    one not."""
    return [([[user_turn(p.prompt), reply(answer)]], is_val_module(p.module, seed, val_fraction), p.kind, label)
            for p in stdlib_prefs() for answer, label in ((p.chosen, 1), (p.rejected, 0))]


def task_examples(source: str) -> list[Example]:
    """A verifiable task's problems with their answers, split as the task splits them (tasks/), kind = level."""
    return [([[user_turn(p.prompt), reply(p.answer)]], p.held_out, f"level {p.level}", None)
            for p in load_task(source).problems()]


@dataclass(frozen=True)
class ChatData:
    """What one kind of fine-tuning data reads, and what it counts per kept example."""

    kind: str  # manifest kind: "sft", "prefs" or "kto"
    parse: Callable[[dict, str, ChatDataConfig], list[Conversation]]
    builtin: Builtin
    unit: str  # what the manifest counts per split: trained tokens, pairs, or desirable completions
    record_help: str
    label: Callable[[dict, str, ChatDataConfig], int] | None = None  # a record's label (KTO's)

    def example(self, record: dict, where: str, fields: ChatDataConfig) -> Example:
        return (self.parse(record, where, fields), None, "",
                self.label(record, where, fields) if self.label else None)

    @property
    def command(self) -> str:
        return f"raytrain data {self.kind}"


SFT = ChatData("sft", sft_example, Builtin(STDLIB_QA, stdlib_qa_examples), "trained_tokens",
               "'prompt'/'response' or 'messages' records")
PREFS = ChatData("prefs", prefs_example, Builtin(STDLIB_PREFS, stdlib_prefs_examples), "pairs",
                 "'prompt'/'chosen'/'rejected' or 'prompt'/'responses'/'ranking' records")
KTO = ChatData("kto", kto_example, Builtin(STDLIB_KTO, stdlib_kto_examples), "desirable",
               "'prompt'/'completion'/'label' or 'messages'/'label' records", kto_label)
BUILTINS = {data.builtin.name: data for data in (SFT, PREFS, KTO)}


def _examples_table(rows: list[Example], where: list[str]) -> pa.Table:
    """One example a row: its conversations (JSON), how many, its split if fixed (None: by hash), its kind, its
    label (-1: none), and where it was read (for errors the tokenizer finds)."""
    return pa.table({
        "conversations": pa.array([json.dumps(c, ensure_ascii=False) for c, _, _, _ in rows], pa.large_string()),
        "responses": pa.array([len(c) for c, _, _, _ in rows], pa.int32()),
        "val": pa.array([v for _, v, _, _ in rows], pa.bool_()),
        "kind": pa.array([k for _, _, k, _ in rows], pa.string()),
        "label": pa.array([-1 if label is None else label for _, _, _, label in rows], pa.int8()),
        "where": pa.array(where, pa.string()),
    })


class _ParseJsonlRecords:
    def __init__(self, data: ChatData, fields: ChatDataConfig):
        self.data, self.fields = data, fields

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, places = [], []
        for content, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist(), strict=True):
            for number, line in enumerate(content.decode("utf-8", "replace").splitlines(), start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); fix the line") from None
                if not isinstance(record, dict):
                    raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
                rows.append(self.data.example(record, where, self.fields))
                places.append(where)
        return _examples_table(rows, places)


class _ParseParquetRecords:
    def __init__(self, data: ChatData, fields: ChatDataConfig):
        self.data, self.fields = data, fields

    def __call__(self, batch: pa.Table) -> pa.Table:
        records, paths = batch.drop_columns(["path"]).to_pylist(), batch.column("path").to_pylist()
        places = [f"{p}, record {json.dumps(r, default=str)[:60]}…" for r, p in zip(records, paths, strict=True)]
        rows = [self.data.example(r, where, self.fields) for r, where in zip(records, places, strict=True)]
        return _examples_table(rows, places)


def read_examples(data: ChatData, inputs: list[str], fields: ChatDataConfig, seed: int, val_fraction: float):
    """A Ray Data dataset of examples (`_examples_table` rows), every record checked."""
    import ray.data

    parts = []
    for name in dict.fromkeys(i for i in inputs if i in BUILTINS or is_task_source(i)):
        builtin = SFT if is_task_source(name) else BUILTINS[name]  # a task gives question–answer pairs
        if builtin is not data:
            raise DataError(f"'{name}' is {builtin.kind} data; use `{builtin.command}`, or "
                            f"'{data.builtin.name}' here")
        examples = task_examples(name) if is_task_source(name) else data.builtin.examples(seed, val_fraction)
        parts.append(ray.data.from_arrow(_examples_table(examples, [f"{name}, example {i}" for i in range(
            len(examples))])))
    paths = [i for i in inputs if i not in BUILTINS and not is_task_source(i)]
    files = resolve_sources(paths) if paths else []
    text = [f.path for f in files if f.kind in ("text", "other")]
    if text:
        raise DataError(f"'{text[0]}' is not a JSONL or Parquet file of records; `{data.command}` reads "
                        f"{data.record_help} (plain text is for `raytrain data prepare`)")
    jsonl = [f.path for f in files if f.kind == "jsonl"]
    parquet = [f.path for f in files if f.kind == "parquet"]
    if jsonl:
        parts.append(ray.data.read_binary_files(jsonl, include_paths=True)
                     .map_batches(_ParseJsonlRecords(data, fields), batch_format="pyarrow", batch_size=1))
    if parquet:
        parts.append(ray.data.read_parquet(parquet, include_paths=True)
                     .map_batches(_ParseParquetRecords(data, fields), batch_format="pyarrow"))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def fit_row(ids: list[int], trained: list[bool], row_len: int) -> tuple[str, int]:
    """("" or "truncated", first kept index) when the conversation fits the row, or (drop reason, -1).

    Tokens are cut from the left; the last reply and the token before it (the end of its prompt) must survive."""
    if not any(trained):
        return "no_reply", -1
    if len(ids) <= row_len:
        return "", 0
    start = len(ids) - row_len
    last_reply = len(trained) - 1 - trained[::-1].index(True)
    while last_reply > 0 and trained[last_reply - 1]:
        last_reply -= 1
    return ("truncated", start) if start < last_reply else ("reply_longer_than_row", -1)


def row_columns(kind: str, responses: int) -> list[str]:
    if kind == "sft":
        return ["tokens", "loss_mask"]
    if kind == "kto":
        return ["tokens", "loss_mask", "kl_tokens", "kl_mask", "label"]
    return [f"response_{i}" for i in range(responses)] + [f"reply_mask_{i}" for i in range(responses)]


def mismatched(conversations: list[Conversation]) -> list[Conversation | None]:
    """KTO's mismatched pairs: each conversation's prompt with the next one's completion (the last with the
    first's); none for a lone conversation."""
    if len(conversations) < 2:
        return [None] * len(conversations)
    return [turns[:-1] + conversations[(i + 1) % len(conversations)][-1:] for i, turns in enumerate(conversations)]


class TokenizeExamples:
    """Actor: examples → padded rows (sft: tokens and loss mask; prefs: one row per ranked response; kto: sft's
    with the mismatched pair and the label), what became of each example, and its units (trained tokens, pairs,
    or whether it is desirable)."""

    def __init__(self, tokenizer_dir: str, kind: str, row_len: int, responses: int, seed: int, val_fraction: float):
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.kind, self.row_len, self.responses = kind, row_len, responses
        self.seed, self.val_fraction = seed, val_fraction

    def _fill(self, rows: dict, tokens: str, mask: str, i: int, ids: list[int], trained: list[bool], start: int):
        kept = len(ids) - start
        rows[tokens][i, :kept] = ids[start:]
        rows[mask][i, :kept] = trained[start:]

    def __call__(self, batch: pa.Table) -> pa.Table:
        n, columns = batch.num_rows, row_columns(self.kind, self.responses)
        rows = {name: np.zeros((n, self.row_len), np.uint8 if name in ("loss_mask", "label") else TOKEN_DTYPE)
                if "mask" in name or name == "label" else np.full((n, self.row_len), self.tokenizer.pad, TOKEN_DTYPE)
                for name in columns}
        texts = batch.column("conversations").to_pylist()
        conversations = [json.loads(text) for text in texts]
        kto = self.kind == "kto"
        kl_pairs = mismatched([c[0] for c in conversations]) if kto else []
        labels = batch.column("label").to_pylist() if kto else []
        status, split_val, units = [], [], []
        for i, (examples, text, val, where) in enumerate(zip(conversations, texts, batch.column("val").to_pylist(),
                                                             batch.column("where").to_pylist(), strict=True)):
            try:
                encoded = [self.tokenizer.encode_conversation(turns) for turns in examples]
            except DataError as exc:
                raise DataError(f"{where}: {exc}") from None
            fits = [fit_row(ids, trained, self.row_len) for ids, trained in encoded]
            dropped = [outcome for outcome, start in fits if start < 0]
            status.append(dropped[0] if dropped else ("truncated" if any(o for o, _ in fits) else ""))
            split_val.append(is_val_document(text, self.seed, self.val_fraction) if val is None else val)
            if dropped:
                units.append(0)
                continue
            for j, ((ids, trained), (_, start)) in enumerate(zip(encoded, fits, strict=True)):
                if self.kind == "prefs":
                    self._fill(rows, f"response_{j}", f"reply_mask_{j}", i, ids, trained, start)
                else:
                    self._fill(rows, "tokens", "loss_mask", i, ids, trained, start)
            if kto:
                rows["label"][i] = labels[i]
                if kl_pairs[i] is not None:  # an estimate's sample: one too long to fit is left out (mask 0)
                    ids, trained = self.tokenizer.encode_conversation(kl_pairs[i])
                    _, start = fit_row(ids, trained, self.row_len)
                    if start >= 0:
                        self._fill(rows, "kl_tokens", "kl_mask", i, ids, trained, start)
            units.append(int(rows["loss_mask"][i].sum()) if self.kind == "sft" else
                         labels[i] if kto else len(fits) * (len(fits) - 1) // 2)
        table = {name: pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), self.row_len)
                 for name, values in rows.items()}
        return pa.table({**table, "status": status, "val": split_val, "units": units, "kind": batch.column("kind")})


class ExampleShardDatasink(ShardDatasink):
    """Each write task writes its kept examples, in order, as one shard per split."""

    def __init__(self, out: Path, row_len: int, shard_bytes: int, columns: list[str]):
        super().__init__(out, row_len, shard_bytes)
        self.columns = columns

    def write(self, blocks, ctx) -> dict:
        parts: dict[str, dict[str, list[np.ndarray]]] = {s: {c: [] for c in self.columns} for s in SPLITS}
        counts: Counter[str] = Counter()
        for table in blocks:
            status = table.column("status").to_pylist()
            val = np.array(table.column("val").to_pylist(), bool)
            units = np.array(table.column("units").to_pylist(), np.int64)
            kept = np.array([s in ("", "truncated") for s in status], bool)
            counts.update(s or "fitted" if s in ("", "truncated") else f"dropped_{s}" for s in status)
            counts.update(f"kind_{k}" for k, keep in zip(table.column("kind").to_pylist(), kept, strict=True)
                          if keep and k)
            for name in self.columns:
                values = table.column(name).combine_chunks().flatten().to_numpy().reshape(-1, self.row_len)
                parts["train"][name].append(values[kept & ~val])
                parts["val"][name].append(values[kept & val])
            counts["train_units"] += int(units[kept & ~val].sum())
            counts["val_units"] += int(units[kept & val].sum())
        result = {"task": ctx.task_idx, "counts": dict(counts), "shards": {}}
        for split in SPLITS:
            columns = {name: np.concatenate(values) for name, values in parts[split].items()}
            if len(columns[self.columns[0]]):
                name = f"{split}/shard-{ctx.task_idx:06d}.parquet"
                write_shard(storage.join(self.out, name), columns)
                result["shards"][split] = {"path": name, "rows": len(columns[self.columns[0]])}
        return result


def run_sft_data_stage(config: Config) -> str:
    return run_chat_data_stage(SFT, config)


def run_prefs_data_stage(config: Config) -> str:
    return run_chat_data_stage(PREFS, config)


def run_kto_data_stage(config: Config) -> str:
    return run_chat_data_stage(KTO, config)


def run_chat_data_stage(data: ChatData, config: Config) -> str:
    prep = config.data.prepare
    out, tokenizer_dir = row_output(prep)
    row_len, inputs = prep.seq_len + (0 if data.kind == "prefs" else 1), config.data.source.inputs
    load_tokenizer(tokenizer_dir).require_chat()  # its template checked here, before any worker starts
    with atomic_output_dir(out, MANIFEST_FILE, prep.overwrite) as tmp:
        init_ray(config.runtime)  # outside the stderr filter: a new local Ray's processes keep their own stderr
        with native_noise_hidden():
            start = time.perf_counter()
            log.info("%s: %s → %s", data.command.removeprefix("raytrain "), ", ".join(inputs), out)
            # Read and checked first: the most responses any example ranks fixes the prefs row columns.
            examples = read_examples(data, inputs, config.data.chat, prep.seed, prep.val_fraction).materialize()
            responses = int(examples.max("responses") or 1)
            columns = row_columns(data.kind, responses)
            tokenized = examples.map_batches(
                TokenizeExamples, fn_constructor_args=(tokenizer_dir, data.kind, row_len, responses, prep.seed,
                                                       prep.val_fraction),
                compute=ActorPoolStrategy(min_size=1, max_size=tokenize_actor_count(prep)),
                batch_size=prep.docs_per_batch, batch_format="pyarrow")
            sink = ExampleShardDatasink(tmp, row_len, int(prep.shard_mib * 2**20), columns)
            tokenized.write_datasink(sink)
            manifest = _finish(data, tmp, sink, config, tokenizer_dir, columns, time.perf_counter() - start)
    ex, train, val = manifest["examples"], manifest["splits"]["train"], manifest["splits"]["val"]
    log.info("%s: %d examples (%d truncated, %d dropped%s) → train %d / val %d rows of %d tokens, %d / %d %s, "
             "in %.1fs → %s", data.command.removeprefix("raytrain "), ex["read"], ex["truncated"], ex["dropped"],
             f" {ex['dropped_by_reason']}" if ex["dropped"] else "", train["rows"], val["rows"], row_len,
             train[data.unit], val[data.unit], data.unit.replace("_", " "), manifest["seconds"], out)
    return out


def _finish(data: ChatData, tmp: str, sink: ExampleShardDatasink, config: Config, tokenizer_dir: str,
            columns: list[str], seconds: float) -> dict:
    counts = sink.counts()
    splits = {}
    for split in SPLITS:
        shards = sink.shards(split)
        splits[split] = {"rows": sum(s["rows"] for s in shards), data.unit: counts[f"{split}_units"],
                         "rows_per_row_group": rows_per_row_group(sink.row_len), "shards": shards}
    dropped = {k.removeprefix("dropped_"): v for k, v in counts.items() if k.startswith("dropped_")}
    read = counts["fitted"] + counts["truncated"] + sum(dropped.values())
    if splits["train"]["rows"] == 0:
        raise DataError(f"no training example fits: {read} read, dropped {dropped or 'none'}; raise --seq-len or "
                        "add examples")
    content = {
        "kind": data.kind, "columns": columns, "row_len": sink.row_len,
        "examples": {"read": read, "truncated": counts["truncated"], "dropped": sum(dropped.values()),
                     "dropped_by_reason": dropped,
                     "by_kind": {k.removeprefix("kind_"): v for k, v in counts.items() if k.startswith("kind_")}},
        "splits": splits,
        "config": {"source": vars(config.data.source), "prepare": vars(config.data.prepare),
                   "chat": vars(config.data.chat)},
    }
    manifest = dataset_manifest(config, tokenizer_dir, seconds, content)
    config.save(storage.join(tmp, "config.yaml"))
    # written last: the dataset is complete
    storage.write_text(storage.join(tmp, MANIFEST_FILE), json.dumps(manifest, indent=2))
    return manifest
