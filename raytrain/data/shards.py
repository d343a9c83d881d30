"""Writing one Parquet shard of fixed-size token rows, without Ray: the write tasks of `raytrain data prepare`,
`data sft` and `data prefs` call it, and so can anything that builds a prepared dataset in one process."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytrain import storage
from raytrain.data.packing import rows_per_row_group


def write_shard(path: str, columns: dict[str, np.ndarray]) -> None:
    """One Parquet shard of fixed-size rows: `tokens` (and `loss_mask`), or a prompt's ranked `response_i`."""
    row_len = next(iter(columns.values())).shape[1]
    table = pa.table({name: pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), row_len)
                      for name, rows in columns.items()})
    filesystem, inner = storage.resolve(path)
    filesystem.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, inner, row_group_size=rows_per_row_group(row_len), compression="zstd",
                   filesystem=filesystem)
