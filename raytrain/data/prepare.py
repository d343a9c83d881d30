"""`raytrain data prepare`: documents → tokens (actor pool) → packed rows → Parquet shards.

Read (Ray Data) → TokenizeDocuments (actor pool, tokenizer loaded once per actor) →
TokenShardDatasink (each write task packs its documents per split and writes one shard per
split). The few tokens a write task cannot fill a row with come back to the driver, which
packs them, in task order, into a last shard: only the final < seq_len + 1 tokens of each
split are dropped. The manifest is written last, and the folder is renamed into place only
when everything is complete.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
from ray.data import ActorPoolStrategy
from ray.data.datasource import Datasink

from raytrain import __version__, storage
from raytrain.config import Config, PrepareConfig
from raytrain.data.manifest import FORMAT, MANIFEST_FILE, SPLITS
from raytrain.data.output import atomic_output_dir
from raytrain.data.packing import TOKEN_DTYPE, is_val_document, pack_rows, rows_per_row_group
from raytrain.data.shards import write_shard  # moved to data/shards.py (Ray-free); still importable from here
from raytrain.data.sources import read_documents, resolve_sources
from raytrain.data.tokenizer import load_tokenizer, tokenizer_file, tokenizer_hash
from raytrain.errors import DataError
from raytrain.runtime import cluster_cpus, init_ray, native_noise_hidden

log = logging.getLogger("raytrain")
MAX_TOKENIZE_ACTORS = 8
# tokenizers runs each batch on several threads; an actor per two logical CPUs keeps them busy.
CPUS_PER_TOKENIZE_ACTOR = 2


class TokenizeDocuments:
    """Actor: tokenizes documents, appends eos (bos first where the tokenizer's models expect it) and assigns each
    document its split."""

    def __init__(self, tokenizer_dir: str, seed: int, val_fraction: float):
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.seed = seed
        self.val_fraction = val_fraction

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        skipped = batch.column("skipped").to_pylist()
        skipped = [reason or ("" if text else "empty") for text, reason in zip(texts, skipped, strict=True)]
        keep = [i for i, reason in enumerate(skipped) if not reason]
        encoded = self.tokenizer.encode_batch_fast([texts[i] for i in keep], add_special_tokens=False)
        with_eos = [self.tokenizer.document_ids(e.ids) for e in encoded]
        lengths = np.zeros(len(texts), np.int64)
        lengths[keep] = [len(ids) for ids in with_eos]
        flat = np.array(list(itertools.chain.from_iterable(with_eos)), TOKEN_DTYPE)
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        return pa.table(
            {
                "tokens": pa.LargeListArray.from_arrays(offsets, flat),
                "val": [bool(not r and is_val_document(t, self.seed, self.val_fraction))
                        for t, r in zip(texts, skipped, strict=True)],
                "replaced_bytes": batch.column("replaced_bytes"),
                "skipped": skipped,
            }
        )


class ShardDatasink(Datasink):
    """Write tasks of about `shard_bytes` each write shards into `out`; `results` holds what each returned
    (its `task` index, counts, shards), in task order."""

    def __init__(self, out: Path, row_len: int, shard_bytes: int):
        self.out = out
        self.row_len = row_len
        self.shard_bytes = shard_bytes
        self.results: list[dict] = []

    @property
    def min_bytes_per_write(self) -> int:
        return self.shard_bytes

    @property
    def supports_distributed_writes(self) -> bool:
        # Shards go to the driver's folder, which is renamed into place there; tokenizing
        # still runs on every node.
        return False

    def on_write_complete(self, write_result) -> None:
        self.results = sorted(write_result.write_returns, key=lambda r: r["task"])

    def counts(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for result in self.results:
            total.update(result["counts"])
        return total

    def shards(self, split: str) -> list[dict]:
        return [r["shards"][split] for r in self.results if split in r["shards"]]


class TokenShardDatasink(ShardDatasink):
    """Packs each write task's documents into rows and writes one shard per split."""

    def write(self, blocks, ctx) -> dict:
        pieces: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
        counts: Counter[str] = Counter()
        for table in blocks:  # Arrow tables: TokenizeDocuments returns them
            tokens = table.column("tokens").combine_chunks()
            flat = tokens.values.to_numpy()
            offsets = tokens.offsets.to_numpy()
            for i, (is_val, replaced, skipped) in enumerate(
                zip(*(table.column(c).to_pylist() for c in ("val", "replaced_bytes", "skipped")),
                    strict=True)
            ):
                counts["bytes_replaced"] += replaced
                if skipped:
                    counts[f"skipped_{skipped}"] += 1
                    continue
                split = "val" if is_val else "train"
                doc = flat[offsets[i] : offsets[i + 1]]
                pieces[split].append(doc)
                counts[f"{split}_documents"] += 1
                counts[f"{split}_tokens"] += len(doc)
        result = {"task": ctx.task_idx, "counts": dict(counts), "shards": {}, "remainders": {}}
        for split in SPLITS:
            rows, remainder = pack_rows(pieces[split], self.row_len)
            result["remainders"][split] = remainder
            if len(rows):
                name = f"{split}/shard-{ctx.task_idx:06d}.parquet"
                write_shard(storage.join(self.out, name), {"tokens": rows})
                result["shards"][split] = {"path": name, "rows": len(rows)}
        return result


def row_output(prep: PrepareConfig) -> tuple[str, str]:
    """(output folder, tokenizer folder), absolute or URIs, of a `raytrain data` command that writes token rows:
    Ray Data's write tasks run in the cluster's processes, whose working folder is not the command's."""
    if not prep.out:
        raise DataError("no output folder; pass --out DIR (or data.prepare.out=DIR)")
    if not prep.tokenizer:
        raise DataError("no tokenizer; pass --tokenizer DIR (from `raytrain data tokenizer`)")
    tokenizer_dir = storage.absolute(prep.tokenizer)
    tokenizer_file(tokenizer_dir)
    return storage.absolute(prep.out), tokenizer_dir


def tokenize_actor_count(prep: PrepareConfig) -> int:
    return prep.tokenize_actors or min(MAX_TOKENIZE_ACTORS, max(1, cluster_cpus() // CPUS_PER_TOKENIZE_ACTOR))


def run_prepare_stage(config: Config) -> str:
    prep = config.data.prepare
    out, tokenizer_dir = row_output(prep)
    files = resolve_sources(config.data.source.inputs, config.data.source.other_files_as_text)
    with atomic_output_dir(out, MANIFEST_FILE, prep.overwrite) as tmp:
        init_ray(config.runtime)  # outside the stderr filter: a new local Ray's processes keep their own stderr
        with native_noise_hidden():
            start = time.perf_counter()
            actors = tokenize_actor_count(prep)
            log.info("prepare: %d files, %d tokenizer actors → %s", len(files), actors, out)
            documents = read_documents(config.data.source, files)
            tokenized = documents.map_batches(
                TokenizeDocuments,
                fn_constructor_args=(tokenizer_dir, prep.seed, prep.val_fraction),
                compute=ActorPoolStrategy(min_size=1, max_size=actors),
                batch_size=prep.docs_per_batch,
                batch_format="pyarrow",
            )
            sink = TokenShardDatasink(tmp, prep.seq_len + 1, int(prep.shard_mib * 2**20))
            tokenized.write_datasink(sink)
            manifest = _finish(tmp, sink, config, tokenizer_dir, files, time.perf_counter() - start)
    _log_summary(out, manifest)
    return out


def _finish(tmp: str, sink: TokenShardDatasink, config: Config, tokenizer_dir: str,
            files: list, seconds: float) -> dict:
    prep = config.data.prepare
    row_len = prep.seq_len + 1
    counts = sink.counts()
    splits = {}
    for split in SPLITS:
        shards = sink.shards(split)
        tail_rows, dropped = pack_rows([r["remainders"][split] for r in sink.results], row_len)
        if len(tail_rows):
            name = f"{split}/shard-{len(sink.results):06d}.parquet"
            write_shard(storage.join(tmp, name), {"tokens": tail_rows})
            shards.append({"path": name, "rows": len(tail_rows)})
        rows = sum(s["rows"] for s in shards)
        splits[split] = {
            "documents": counts[f"{split}_documents"],
            "tokens": counts[f"{split}_tokens"],  # tokenizer output plus one eos per document
            "document_tokens": counts[f"{split}_tokens"] - counts[f"{split}_documents"],
            "rows": rows,
            "packed_tokens": rows * row_len,
            "dropped_tokens": len(dropped),
            "rows_per_row_group": rows_per_row_group(row_len),
            "shards": shards,
        }
    skipped = {k.removeprefix("skipped_"): v for k, v in counts.items() if k.startswith("skipped_")}
    read = sum(skipped.values()) + splits["train"]["documents"] + splits["val"]["documents"]
    if splits["train"]["rows"] == 0:
        total = splits["train"]["tokens"] + splits["val"]["tokens"]
        raise DataError(
            f"the corpus is too small: {read} documents, {sum(skipped.values())} skipped, "
            f"{splits['train']['tokens']} train tokens ({total} in all) for rows of "
            f"{row_len} tokens; add text or lower --seq-len"
        )
    if prep.val_fraction > 0 and splits["val"]["rows"] == 0:
        log.warning("prepare: the val split holds no full row; raise --val-fraction for validation")
    manifest = dataset_manifest(config, tokenizer_dir, seconds, {
        "kind": "pretrain",
        "files": len(files),
        "documents": {"read": read, "skipped": sum(skipped.values()), "skipped_by_reason": skipped},
        "bytes_replaced": counts["bytes_replaced"],
        "splits": splits,
        "tokens_per_s": round((splits["train"]["tokens"] + splits["val"]["tokens"]) / seconds),
        "config": {"source": vars(config.data.source), "prepare": vars(prep)},
    })
    config.save(storage.join(tmp, "config.yaml"))
    # Written last: its presence marks the dataset complete.
    storage.write_text(storage.join(tmp, MANIFEST_FILE), json.dumps(manifest, indent=2))
    return manifest


def tokenizer_info(tokenizer_dir: str) -> dict:
    """What a manifest (and a checkpoint, through it) records of its tokenizer."""
    tokenizer = load_tokenizer(tokenizer_dir)
    return {"path": tokenizer_dir, "sha256": tokenizer_hash(tokenizer_dir), "vocab_size": tokenizer.get_vocab_size(),
            "special_tokens": tokenizer.special}


def dataset_manifest(config: Config, tokenizer_dir: str, seconds: float, content: dict) -> dict:
    """What every prepared dataset's manifest says (format, rows, tokenizer, provenance) around `content`."""
    return {
        "format": FORMAT,
        "seq_len": config.data.prepare.seq_len,
        "row_len": config.data.prepare.seq_len + 1,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "tokenizer": tokenizer_info(tokenizer_dir),
        "sources": config.data.source.inputs,
        **content,
        "seconds": round(seconds, 2),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "raytrain_version": __version__,
    }


def _log_summary(out: Path, manifest: dict) -> None:
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    docs = manifest["documents"]
    log.info(
        "prepare: %d documents (%d skipped, %d bytes replaced) → train %d rows / val %d rows "
        "of %d tokens; %.0f tokens/s in %.1fs → %s",
        docs["read"], docs["skipped"], manifest["bytes_replaced"], train["rows"], val["rows"],
        manifest["row_len"], manifest["tokens_per_s"], manifest["seconds"], out,
    )
