"""Tokenizer and prepare stages end to end on a real local Ray, and streaming through Ray Data."""

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raytrain.data.manifest import PreparedDataset
from raytrain.data.packing import is_val_document
from raytrain.data.sources import iter_local_documents, resolve_sources
from raytrain.data.stream import BatchOrder, read_rows, stream_batches
from raytrain.data.tokenizer import load_tokenizer

pytestmark = pytest.mark.ray


def documents_without_ray(inputs: list[str]) -> tuple[list[str], int, int]:
    """The oracle: (non-empty documents, empty ones, bytes replaced), read by plain Python."""
    docs = list(iter_local_documents(resolve_sources(inputs)))
    texts = [text for text, _ in docs if text]
    return texts, len(docs) - len(texts), sum(replaced for _, replaced in docs)


def test_manifest_counts_every_token_the_tokenizer_produces(corpus, tiny_tokenizer, tiny_dataset):
    dataset = PreparedDataset.open(tiny_dataset)
    manifest = dataset.manifest
    docs, empty, replaced = documents_without_ray([str(corpus)])
    tokenizer = load_tokenizer(tiny_tokenizer)
    encoded = [e.ids for e in tokenizer.encode_batch_fast(docs, add_special_tokens=False)]
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]

    assert train["document_tokens"] + val["document_tokens"] == sum(map(len, encoded))
    assert manifest["documents"] == {  # LICENSE and todo.rst are counted, not read
        "read": len(docs) + empty + 2, "skipped": empty + 2,
        "skipped_by_reason": {"empty": empty, "unsupported_suffix": 2},
    }
    assert manifest["bytes_replaced"] == replaced == 3 + 128 * 4
    assert val["documents"] == sum(is_val_document(d, 0, 0.1) for d in docs) > 0
    assert manifest["tokenizer"]["special_tokens"]["eos"] == 1

    for name, info in manifest["splits"].items():
        split = dataset.split(name)
        assert len(split.paths) == len(info["shards"]) > 1
        rows = read_rows(split, np.arange(split.num_rows), dataset.row_len)
        assert rows.shape == (info["rows"], 33)
        assert info["packed_tokens"] + info["dropped_tokens"] == info["tokens"]
        assert info["dropped_tokens"] < dataset.row_len
        # The rows hold exactly the split's document tokens (each + eos), bar the dropped tail.
        expected = Counter()
        for doc, ids in zip(docs, encoded, strict=True):
            if is_val_document(doc, 0, 0.1) == (name == "val"):
                expected.update(ids + [1])
        packed = Counter(rows.reshape(-1).tolist())
        assert not packed - expected
        assert (expected - packed).total() == info["dropped_tokens"]


def test_prepared_files_are_parquet_with_small_row_groups(tiny_dataset):
    dataset = PreparedDataset.open(tiny_dataset)
    first = pq.ParquetFile(dataset.split("train").paths[0])
    assert first.schema_arrow.field("tokens").type.list_size == 33
    assert first.metadata.row_group(0).num_rows == dataset.split("train").rows_per_row_group
    assert (Path(tiny_dataset) / "config.yaml").is_file()
    assert not list(Path(tiny_dataset).parent.glob(".*tmp*"))


def test_global_batches_identical_for_1_2_4_consumers_and_after_resume(tiny_dataset):
    dataset = PreparedDataset.open(tiny_dataset)
    num_rows = dataset.split("train").num_rows
    order = BatchOrder(num_rows, global_batch=256, seed=11)
    steps = num_rows // 256 + 3  # runs past an epoch boundary
    assert (steps - 1) * 256 // num_rows == 1  # the last step is in the second epoch

    def stream(consumers: int, start: int = 0) -> list[np.ndarray]:
        per_consumer = [
            list(stream_batches(dataset, order, consumer=c, num_consumers=consumers,
                                start_step=start, num_steps=steps - start))
            for c in range(consumers)
        ]
        for parts in per_consumer:
            assert [step for step, _ in parts] == list(range(start, steps))
        return [np.concatenate([parts[i][1] for parts in per_consumer]) for i in range(steps - start)]

    single = stream(1)
    for step in (0, steps - 1):
        expected = read_rows(dataset.split("train"), order.consumer_rows(step), dataset.row_len)
        assert np.array_equal(single[step], expected)
    for consumers in (2, 4):
        assert all(np.array_equal(a, b) for a, b in zip(single, stream(consumers), strict=True))
    resume_at = steps - 4
    resumed = stream(2, start=resume_at)
    assert all(np.array_equal(a, b) for a, b in zip(single[resume_at:], resumed, strict=True))
    # Read in this process instead (a loop run without Ray): the same rows, also for a consumer's slice.
    local = list(stream_batches(dataset, order, consumer=1, num_consumers=2, start_step=resume_at,
                                num_steps=steps - resume_at, ray_data=False))
    assert [step for step, _ in local] == list(range(resume_at, steps))
    assert all(np.array_equal(rows, whole[128:]) for (_, rows), whole in zip(local, single[resume_at:], strict=True))
    # The val split streams in file order for evaluation.
    val_rows = dataset.split("val").num_rows
    val_order = BatchOrder(val_rows, global_batch=4, seed=0, shuffle=False)
    _, first_val = next(stream_batches(dataset, val_order, split="val", num_steps=1))
    assert np.array_equal(first_val, read_rows(dataset.split("val"), np.arange(4), dataset.row_len))


def test_stdlib_commands_from_the_issue(ray_session, tmp_path):
    """`raytrain data tokenizer/prepare --input stdlib` as documented, checked token for token."""
    from raytrain.cli import main

    tok, data = tmp_path / "T", tmp_path / "D"
    assert main(["data", "tokenizer", "--input", "stdlib", "--vocab-size", "8192", "--out", str(tok)]) == 0
    assert main(["data", "prepare", "--input", "stdlib", "--tokenizer", str(tok), "--seq-len", "256",
                 "--out", str(data)]) == 0
    manifest = PreparedDataset.open(data).manifest
    assert manifest["tokenizer"]["vocab_size"] == 8192
    texts = [text for text, _ in iter_local_documents(resolve_sources(["stdlib"]))]
    encoded = load_tokenizer(tok).encode_batch_fast([t for t in texts if t], add_special_tokens=False)
    splits = manifest["splits"].values()
    assert sum(s["document_tokens"] for s in splits) == sum(len(e.ids) for e in encoded)
    assert all(s["rows"] > 0 for s in splits)
