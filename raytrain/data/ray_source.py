"""The Ray Data datasource that streams one consumer's slices of global batches (data/stream.py's order).

Kept apart from data/stream.py so that the batch order and in-process reads import no Ray: stream_batches
imports this module only when a stream goes through Ray Data.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from raytrain.data.manifest import SplitShards
from raytrain.data.packing import TOKEN_DTYPE
from raytrain.data.stream import BatchOrder, read_rows

ROWS_PER_READ_TASK = 1024


class GlobalBatchDatasource(Datasource):
    """One consumer's slices of global batches [start_step, start_step + num_steps)."""

    def __init__(self, shards: SplitShards, row_len: int, order: BatchOrder, consumer: int,
                 num_consumers: int, start_step: int, num_steps: int, columns: tuple[str, ...] = ("tokens",)):
        self.shards = shards
        self.row_len = row_len
        self.columns = columns
        self.values_per_row = row_len * len(columns)
        self.order = order
        self.consumer = consumer
        self.num_consumers = num_consumers
        self.start_step = start_step
        self.num_steps = num_steps
        self.local_batch = order.local_batch(num_consumers)

    def estimate_inmemory_data_size(self) -> int:
        return self.num_steps * self.local_batch * self.values_per_row * np.dtype(TOKEN_DTYPE).itemsize

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        steps_per_task = max(1, ROWS_PER_READ_TASK // self.local_batch)
        end = self.start_step + self.num_steps
        tasks = []
        for first in range(self.start_step, end, steps_per_task):
            last = min(first + steps_per_task, end)
            rows = (last - first) * self.local_batch
            metadata = BlockMetadata(
                num_rows=rows,
                size_bytes=rows * self.values_per_row * np.dtype(TOKEN_DTYPE).itemsize,
                input_files=None,
                exec_stats=None,
            )
            tasks.append(ReadTask(functools.partial(self._read, first, last), metadata))
        return tasks

    def _read(self, first: int, last: int) -> list[pa.Table]:
        steps = range(first, last)
        ids = np.concatenate(
            [self.order.consumer_rows(s, self.consumer, self.num_consumers) for s in steps]
        )
        rows = read_rows(self.shards, ids, self.row_len, self.columns)
        tokens = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), self.values_per_row)
        step_column = np.repeat(np.arange(first, last, dtype=np.int64), self.local_batch)
        return [pa.table({"step": step_column, "tokens": tokens})]
