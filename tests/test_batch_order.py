"""The global batch order and the row reader, without Ray."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from raytrain.data.manifest import SplitShards
from raytrain.data.prepare import write_shard
from raytrain.data.stream import BatchOrder, read_rows
from raytrain.errors import DataError


def global_batch(order: BatchOrder, step: int, consumers: int) -> np.ndarray:
    return np.concatenate([order.consumer_rows(step, c, consumers) for c in range(consumers)])


def test_each_epoch_visits_every_row_once_and_reshuffles():
    order = BatchOrder(num_rows=30, global_batch=6, seed=3)
    epoch0 = np.concatenate([order.consumer_rows(s) for s in range(5)])
    epoch1 = np.concatenate([order.consumer_rows(s) for s in range(5, 10)])
    assert sorted(epoch0) == sorted(epoch1) == list(range(30))
    assert not np.array_equal(epoch0, epoch1)
    assert np.array_equal(epoch0, BatchOrder(30, 6, seed=3).epoch_order(0))
    assert not np.array_equal(epoch0, BatchOrder(30, 6, seed=4).epoch_order(0))


@given(
    rows=st.integers(1, 200),
    per_consumer=st.integers(1, 16),
    step=st.integers(0, 500),
    seed=st.integers(0, 2**32),
)
def test_global_batch_is_independent_of_consumers(rows, per_consumer, step, seed):
    order = BatchOrder(rows, per_consumer * 4, seed)
    one = order.consumer_rows(step, 0, 1)
    assert np.array_equal(global_batch(order, step, 2), one)
    assert np.array_equal(global_batch(order, step, 4), one)
    # Positions run on across epoch boundaries without a gap.
    positions = step * order.global_batch + np.arange(order.global_batch)
    expected = [order.epoch_order(p // rows)[p % rows] for p in positions]
    assert np.array_equal(one, expected)


def test_unshuffled_order_is_sequential():
    order = BatchOrder(10, 4, seed=0, shuffle=False)
    assert list(order.consumer_rows(2)) == [8, 9, 0, 1]


def test_batch_must_split_over_consumers():
    with pytest.raises(DataError, match="global batch 6 does not split over 4"):
        BatchOrder(10, 6, 0).consumer_rows(0, 0, 4)
    with pytest.raises(DataError, match="holds no rows"):
        BatchOrder(0, 6, 0)


def test_read_rows_fetches_exact_rows_across_shards_and_row_groups(tmp_path):
    row_len = 2000  # 16 rows per 32 KiB row group: several groups per shard
    sizes = [50, 7, 33]
    paths, start = [], 0
    for i, n in enumerate(sizes):
        rows = (np.arange(start, start + n)[:, None] * row_len + np.arange(row_len)).astype(np.int32)
        write_shard(tmp_path / f"s{i}.parquet", {"tokens": rows, "loss_mask": (rows % 3 == 0).astype(np.uint8)})
        paths.append(str(tmp_path / f"s{i}.parquet"))
        start += n
    shards = SplitShards(tuple(paths), tuple(sizes), rows_per_row_group=16)
    ids = np.random.default_rng(0).permutation(sum(sizes))[:41]
    ids = np.concatenate([ids, ids[:3]])  # a row asked twice comes twice
    got = read_rows(shards, ids, row_len)
    assert np.array_equal(got[:, 0] // row_len, ids)
    assert np.array_equal(got[:, -1], ids * row_len + row_len - 1)
    # Fine-tuning rows: several columns come stacked, [rows, columns, row_len].
    both = read_rows(shards, ids, row_len, ("tokens", "loss_mask"))
    assert both.shape == (len(ids), 2, row_len)
    assert np.array_equal(both[:, 0], got) and np.array_equal(both[:, 1], got % 3 == 0)


def test_masked_lm_mask_is_independent_of_layout():
    import torch

    from raytrain.train.objectives import IGNORE, Objective

    rows = torch.arange(8 * 65).reshape(8, 65) + 10
    objective = Objective("masked", seed=3, global_batch=8, mask_fraction=0.25, mask_id=6)
    whole_inputs, whole_targets = objective(rows, step=5, first_row=0)
    halves = [objective(rows[i : i + 4], step=5, first_row=i) for i in (0, 4)]
    assert torch.equal(torch.cat([h[0] for h in halves]), whole_inputs)
    assert torch.equal(torch.cat([h[1] for h in halves]), whole_targets)
    masked = whole_targets != IGNORE
    assert 0.15 < masked.float().mean() < 0.35
    assert (whole_inputs[masked] == 6).all() and torch.equal(whole_targets[masked], rows[:, :-1][masked])
    assert torch.equal(whole_inputs[~masked], rows[:, :-1][~masked])
    # Another step draws another mask.
    assert not torch.equal(objective(rows, step=6, first_row=0)[1], whole_targets)
    assert not objective.causal and Objective("causal", seed=0, global_batch=8, mask_fraction=0.1, mask_id=6).causal


def test_learning_rate_schedule():
    from raytrain.config import TrainConfig
    from raytrain.train.optim import lr_at

    config = TrainConfig(lr=1.0, warmup_steps=4, steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, config) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, config) == pytest.approx(0.55)
    assert lr_at(14, config) == pytest.approx(0.1)
