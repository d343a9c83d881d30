"""Worker-side streaming of global batches through Ray Data (Megatron-style indexed order).

The global batch sequence is a pure function of (rows in the split, seed, global batch
size): epoch e visits the rows in a seeded permutation, epochs follow each other without a
gap, and global batch s holds sample positions [s·B, (s+1)·B) of that endless sequence. A
consumer (a data-parallel rank) takes its contiguous 1/n of each global batch, so the
union over consumers is the same for any n, and step s can be computed without having
produced steps 0..s-1: resuming is exact.

Each consumer reads only the Parquet row groups that hold its rows, through a Ray Data
datasource whose read tasks cover consecutive steps and emit rows in step order (data/ray_source.py,
imported only when a stream goes through Ray Data: this module, and a loop that reads in its own
process, need no Ray).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from raytrain import storage
from raytrain.data.manifest import PreparedDataset, SplitShards
from raytrain.data.packing import TOKEN_DTYPE
from raytrain.errors import DataError


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_rows)
    return order.astype(np.int32 if num_rows < 2**31 else np.int64)


@dataclass(frozen=True)
class BatchOrder:
    """Which rows make up each global batch."""

    num_rows: int
    global_batch: int
    seed: int
    shuffle: bool = True

    def __post_init__(self):
        if self.num_rows < 1:
            raise DataError("the split holds no rows; prepare more data or use another split")
        if self.global_batch < 1:
            raise DataError(f"global batch size is {self.global_batch}; it must be >= 1")

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return _epoch_permutation(self.num_rows, self.seed, epoch)

    def consumer_rows(self, step: int, consumer: int = 0, num_consumers: int = 1) -> np.ndarray:
        """Row ids of consumer's slice of global batch `step`."""
        local = self.local_batch(num_consumers)
        positions = step * self.global_batch + consumer * local + np.arange(local, dtype=np.int64)
        epochs, within = np.divmod(positions, self.num_rows)
        rows = np.empty(local, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            rows[mask] = self.epoch_order(int(epoch))[within[mask]]
        return rows

    def local_batch(self, num_consumers: int) -> int:
        if self.global_batch % num_consumers:
            raise DataError(
                f"global batch {self.global_batch} does not split over {num_consumers} "
                "data-parallel consumers; make the batch a multiple of the data-parallel size"
            )
        return self.global_batch // num_consumers


def read_rows(shards: SplitShards, row_ids: np.ndarray, row_len: int, columns: tuple[str, ...] = ("tokens",)
              ) -> np.ndarray:
    """Rows by global id, in the given order, reading only the row groups that hold them.

    [n, row_len] for one column; [n, columns, row_len] for several (fine-tuning rows: tokens, loss_mask)."""
    shard_of, local = shards.locate(row_ids)
    out = np.empty((len(row_ids), len(columns), row_len), TOKEN_DTYPE)
    for shard in np.unique(shard_of):
        picks = np.flatnonzero(shard_of == shard)
        path = shards.paths[shard]
        parquet = pq.ParquetFile(storage.open_input_file(path) if storage.is_uri(path) else path)
        group_rows = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
        group_starts = np.cumsum([0, *group_rows])
        group_of = np.searchsorted(group_starts, local[picks], side="right") - 1
        groups = np.unique(group_of)
        table = parquet.read_row_groups(groups.tolist(), columns=list(columns))
        # Where each chosen row group starts inside the rows just read.
        read_starts = np.cumsum([0, *(group_rows[g] for g in groups)])[:-1]
        at = read_starts[np.searchsorted(groups, group_of)] + (local[picks] - group_starts[group_of])
        for c, name in enumerate(columns):
            out[picks, c] = table.column(name).combine_chunks().flatten().to_numpy().reshape(-1, row_len)[at]
    return out[:, 0] if len(columns) == 1 else out


def stream_batches(
    dataset: PreparedDataset,
    order: BatchOrder,
    *,
    split: str = "train",
    consumer: int = 0,
    num_consumers: int = 1,
    start_step: int = 0,
    num_steps: int,
    read_cpus: float = 0.0,
    ray_data: bool = True,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (step, rows [local_batch, seq_len + 1]) for this consumer, in step order; fine-tuning data
    yields [local_batch, 2, seq_len + 1]: tokens and loss mask.

    Through Ray Data (read tasks ahead of the consumer), or with ray_data=False read in this process (a loop run
    without Ray): the same rows either way. Read tasks reserve no CPU by default: the worker that consumes them
    already holds its CPUs, and a reservation could starve them when workers (or a placement group not yet
    released by the previous run) take every CPU of the cluster.
    """
    if not 0 <= consumer < num_consumers:
        raise DataError(f"consumer {consumer} is outside 0..{num_consumers - 1}")
    if not ray_data:
        shards = dataset.split(split)
        for step in range(start_step, start_step + num_steps):
            yield step, read_rows(shards, order.consumer_rows(step, consumer, num_consumers), dataset.row_len,
                                  dataset.columns)
        return
    import ray.data

    from raytrain.data.ray_source import GlobalBatchDatasource

    source = GlobalBatchDatasource(
        dataset.split(split), dataset.row_len, order, consumer, num_consumers, start_step, num_steps,
        dataset.columns,
    )
    shape = (-1, dataset.row_len) if len(dataset.columns) == 1 else (-1, len(dataset.columns), dataset.row_len)
    ds = ray.data.read_datasource(source, num_cpus=read_cpus)
    ds.context.execution_options.preserve_order = True
    expected = start_step
    for batch in ds.iter_batches(batch_size=source.local_batch, batch_format="pyarrow",
                                 prefetch_batches=2):
        steps = batch.column("step").to_numpy()
        if steps[0] != expected or steps[-1] != expected:
            raise RuntimeError(f"data stream out of order: expected step {expected}, got {steps}")
        rows = batch.column("tokens").combine_chunks().flatten().to_numpy()
        yield expected, rows.reshape(shape).copy()  # a writable array for torch
        expected += 1
    if expected != start_step + num_steps:
        raise RuntimeError(f"data stream ended at step {expected}, not {start_step + num_steps}")
