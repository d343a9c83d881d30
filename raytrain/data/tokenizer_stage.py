"""`raytrain data tokenizer`: read documents with Ray Data, train BPE, save atomically."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator

from raytrain import storage
from raytrain.config import Config
from raytrain.data.output import atomic_output_dir
from raytrain.data.sources import read_documents, resolve_sources
from raytrain.data.tokenizer import TOKENIZER_FILE, save_tokenizer, train_tokenizer
from raytrain.errors import DataError
from raytrain.runtime import init_ray

log = logging.getLogger("raytrain")


def run_tokenizer_stage(config: Config) -> str:
    tok_config = config.data.tokenizer
    if not tok_config.out:
        raise DataError("no output folder; pass --out DIR (or data.tokenizer.out=DIR)")
    out = tok_config.out
    files = resolve_sources(config.data.source.inputs, config.data.source.other_files_as_text)
    with atomic_output_dir(out, TOKENIZER_FILE, overwrite=tok_config.overwrite) as tmp:
        init_ray(config.runtime)
        counts: Counter[str] = Counter()
        start = time.perf_counter()
        texts = _texts(read_documents(config.data.source, files), counts)
        tokenizer = train_tokenizer(texts, tok_config.vocab_size, tok_config.min_frequency,
                                    tok_config.split_digits)
        if counts["documents"] == 0:
            raise DataError(
                f"inputs {config.data.source.inputs} hold no non-empty documents; "
                "a tokenizer needs text"
            )
        metadata = {
            "vocab_size": tokenizer.get_vocab_size(),
            "requested_vocab_size": tok_config.vocab_size,
            "sources": config.data.source.inputs,
            "files": len(files),
            **counts,
            "seconds": round(time.perf_counter() - start, 2),
        }
        save_tokenizer(tokenizer, tmp, metadata)
        config.save(storage.join(tmp, "config.yaml"))
    log.info(
        "tokenizer: %d tokens from %d documents (%d bytes) in %.1fs → %s",
        metadata["vocab_size"], counts["documents"], counts["bytes"], metadata["seconds"], out,
    )
    return out


def _texts(dataset, counts: Counter[str]) -> Iterator[str]:
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=256):
        for text, skipped, replaced in zip(
            batch.column("text").to_pylist(),
            batch.column("skipped").to_pylist(),
            batch.column("replaced_bytes").to_pylist(),
            strict=True,
        ):
            counts["bytes_replaced"] += replaced
            if skipped or not text:
                counts["documents_skipped"] += 1
                continue
            counts["documents"] += 1
            counts["bytes"] += len(text.encode())
            yield text
