"""Raw text sources → one Ray Data dataset of documents.

A document is a whole .txt/.md file, one JSONL line, or one Parquet row. Every row of the
returned dataset has `text` (str), `replaced_bytes` (bytes that were not UTF-8 and became
U+FFFD) and `skipped` (why a record holds no document, or "").
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytrain.config import SourceConfig
from raytrain.errors import DataError
from raytrain.tasks import is_task_source, load_task

# "other": a file found in a folder or glob with none of the suffixes below (LICENSE, notes.rst), skipped and
# counted unless data.source.other_files_as_text reads it as text.
Kind = Literal["text", "jsonl", "parquet", "other", "task"]  # task: a verifiable task's problems (tasks/)
KIND_BY_SUFFIX: dict[str, Kind] = {
    ".txt": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
}
log = logging.getLogger("raytrain")
STDLIB = "stdlib"
# Folders of the standard library that hold tests or third-party code, not the library.
STDLIB_EXCLUDED = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
GLOB_CHARS = re.compile(r"[*?\[]")
SURROGATE_ESCAPES = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True)
class SourceFile:
    path: str  # local path, or a URI with its scheme
    kind: Kind


def stdlib_files() -> list[str]:
    """The running interpreter's standard library sources, tests and site-packages excluded."""
    files = []
    for folder, subfolders, names in os.walk(sysconfig.get_paths()["stdlib"]):
        # Pruned, not filtered: site-packages can be far larger than the library itself.
        subfolders[:] = [d for d in subfolders if d not in STDLIB_EXCLUDED]
        files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    return sorted(files)


def resolve_sources(inputs: list[str], other_files_as_text: bool = False) -> list[SourceFile]:
    """Expand inputs (files, folders, globs, URIs, `stdlib`, `task:NAME`) into files; fail on anything unusable.

    Files of other suffixes in a folder or glob are kept as kind "other" (skipped and counted), or read as
    text with `other_files_as_text`; one warning says how many and names one.
    """
    other = "text" if other_files_as_text else "other"
    files: list[SourceFile] = []
    for item in inputs:
        if item == STDLIB:
            files += [SourceFile(p, "text") for p in stdlib_files()]
            continue
        if is_task_source(item):
            load_task(item)  # checked here, before any reading starts
            files.append(SourceFile(item, "task"))
            continue
        found = [SourceFile(path, KIND_BY_SUFFIX.get(_suffix(path), other)) for path in _expand(item)]
        if not any(f.kind != "other" for f in found):
            hint = f" ({_others_hint([f for f in found if f.kind == 'other'])})" if found else ""
            raise DataError(
                f"input '{item}' has no .txt, .md, .jsonl or .parquet files{hint}; "
                "check the path or pass a glob such as 'dir/**/*.jsonl'"
            )
        files += found
    files = list(dict.fromkeys(files))
    skipped = [f for f in files if f.kind == "other"]
    if skipped:
        log.warning("inputs: %s", _others_hint(skipped))
    return files


def _others_hint(others: list[SourceFile]) -> str:
    return (f"{len(others)} file(s) skipped as not .txt/.md/.jsonl/.parquet, e.g. '{others[0].path}'; "
            "pass --other-files-as-text to read them as text")


def _suffix(path: str) -> str:
    return Path(path.rsplit("/", 1)[-1]).suffix.lower()


def filesystem_of(item: str) -> tuple[pafs.FileSystem, str]:
    if "://" in item:
        try:
            return pafs.FileSystem.from_uri(item)
        except Exception as exc:  # pyarrow raises several types for bad or unreachable URIs
            raise DataError(f"input '{item}' cannot be opened: {exc}") from None
    return pafs.LocalFileSystem(), str(Path(item).expanduser().absolute())


def _expand(item: str) -> list[str]:
    fs, path = filesystem_of(item)
    scheme = item.split("://", 1)[0] + "://" if "://" in item else ""
    # A glob is matched against a recursive listing of the folder before its first wildcard.
    wildcard = GLOB_CHARS.search(path)
    base = path[: wildcard.start()].rsplit("/", 1)[0] if wildcard else path
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"input '{item}' does not exist; check the path")
    if info.type == pafs.FileType.File:
        if _suffix(path) not in KIND_BY_SUFFIX:
            raise DataError(
                f"input '{item}' has an unsupported type; use .txt, .md, .jsonl or .parquet, or name its folder "
                "with --other-files-as-text to read it as text"
            )
        return [scheme + path if scheme else path]
    listing = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    found = sorted(
        f.path
        for f in listing
        if f.type == pafs.FileType.File
        and not any(part.startswith(".") for part in f.path[len(base):].split("/"))  # .git, .DS_Store
        and (not wildcard or fnmatch.fnmatch(f.path, path))
    )
    return [scheme + p if scheme else p for p in found]


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode UTF-8, replacing each invalid byte with U+FFFD; returns (text, bytes replaced)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        escaped = data.decode("utf-8", "surrogateescape")
        return SURROGATE_ESCAPES.subn("\ufffd", escaped)


def parse_jsonl(
    data: bytes, path: str, text_field: str, skip_bad_records: bool
) -> list[tuple[str, int, str]]:
    """Documents of one JSONL file as (text, replaced_bytes, skipped reason)."""
    text, replaced = decode_utf8(data)
    rows: list[tuple[str, int, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        problem = ""
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problem, reason = f"invalid JSON ({exc.msg} at column {exc.colno})", "malformed_json"
        else:
            if not isinstance(record, dict) or text_field not in record:
                fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                problem = f"no field '{text_field}' (found: {fields}); set --text-field"
                reason = "missing_field"
            elif not isinstance(record[text_field], str):
                kind = type(record[text_field]).__name__
                problem, reason = f"field '{text_field}' is {kind}, not a string", "not_a_string"
        if problem:
            if not skip_bad_records:
                raise DataError(
                    f"{path}:{number}: {problem}; fix the line or pass --skip-bad-records"
                )
            rows.append(("", 0, reason))
        else:
            rows.append((record[text_field], 0, ""))
    if rows and replaced:
        # The replaced bytes belong to the file; count them once, on its first document.
        first_text, _, first_reason = rows[0]
        rows[0] = (first_text, replaced, first_reason)
    return rows


def _documents_table(rows: list[tuple[str, int, str]]) -> pa.Table:
    texts, replaced, skipped = zip(*rows, strict=True) if rows else ((), (), ())
    return pa.table(
        {
            "text": pa.array(texts, pa.large_string()),
            "replaced_bytes": pa.array(replaced, pa.int64()),
            "skipped": pa.array(skipped, pa.string()),
        }
    )


def _decode_text_files(batch: pa.Table) -> pa.Table:
    rows = [(*decode_utf8(data), "") for data in batch.column("bytes").to_pylist()]
    return _documents_table(rows)


class _ParseJsonlFiles:
    def __init__(self, text_field: str, skip_bad_records: bool):
        self.text_field = text_field
        self.skip_bad_records = skip_bad_records

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows: list[tuple[str, int, str]] = []
        for data, path in zip(
            batch.column("bytes").to_pylist(), batch.column("path").to_pylist(), strict=True
        ):
            rows += parse_jsonl(data, path, self.text_field, self.skip_bad_records)
        return _documents_table(rows)


class _ParquetDocuments:
    def __init__(self, text_field: str):
        self.text_field = text_field

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for value in batch.column(self.text_field).to_pylist():
            if value is None:
                rows.append(("", 0, "null_text"))
            elif isinstance(value, bytes):
                rows.append((*decode_utf8(value), ""))
            else:
                rows.append((value, 0, ""))
        return _documents_table(rows)


def iter_local_documents(files: list[SourceFile], text_field: str = "text") -> Iterator[tuple[str, int]]:
    """(text, replaced bytes) of each document, read in this process without Ray.

    The plain reference reader that tests and benchmarks compare the Ray Data path with.
    """
    for source in files:
        if source.kind == "other":
            continue
        if source.kind == "task":
            yield from ((text, 0) for text in task_texts(source.path))
            continue
        fs, path = filesystem_of(source.path)
        if source.kind == "parquet":
            for text in pq.read_table(path, columns=[text_field], filesystem=fs).column(0).to_pylist():
                yield text or "", 0
            continue
        with fs.open_input_stream(path) as stream:
            data = stream.read()
        if source.kind == "text":
            yield decode_utf8(data)
        else:
            yield from ((text, replaced) for text, replaced, _ in parse_jsonl(data, path, text_field, False))


def check_parquet_columns(files: list[str], text_field: str) -> None:
    for path in files:
        fs, local = filesystem_of(path)
        schema = pq.read_schema(local, filesystem=fs)
        if text_field not in schema.names:
            raise DataError(
                f"{path}: no column '{text_field}' (columns: {', '.join(schema.names)}); "
                "set --text-field to the column that holds the text"
            )


def task_texts(source: str) -> list[str]:
    """A task's train problems with their answers, one document each (its held-out problems never appear)."""
    return [p.text for p in load_task(source).split(held_out=False)]


def read_documents(config: SourceConfig, files: list[SourceFile] | None = None):
    """A Ray Data dataset of documents from the configured inputs."""
    import ray.data

    files = files if files is not None else resolve_sources(config.inputs, config.other_files_as_text)
    by_kind = {kind: [f.path for f in files if f.kind == kind] for kind in ("text", "jsonl", "parquet", "other",
                                                                           "task")}
    parts = [ray.data.from_arrow(_documents_table([(text, 0, "") for text in task_texts(name)]))
             for name in by_kind["task"]]
    if by_kind["other"]:  # not read: one skipped record each, so the counts say what was left out
        parts.append(ray.data.from_arrow(_documents_table([("", 0, "unsupported_suffix")] * len(by_kind["other"]))))
    if by_kind["text"]:
        parts.append(
            ray.data.read_binary_files(by_kind["text"]).map_batches(
                _decode_text_files, batch_format="pyarrow", batch_size=64
            )
        )
    if by_kind["jsonl"]:
        parse = _ParseJsonlFiles(config.text_field, config.skip_bad_records)
        parts.append(
            ray.data.read_binary_files(by_kind["jsonl"], include_paths=True).map_batches(
                parse, batch_format="pyarrow", batch_size=1
            )
        )
    if by_kind["parquet"]:
        check_parquet_columns(by_kind["parquet"], config.text_field)
        parts.append(
            ray.data.read_parquet(by_kind["parquet"], columns=[config.text_field]).map_batches(
                _ParquetDocuments(config.text_field), batch_format="pyarrow"
            )
        )
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
