"""`raytrain demo`: the training chain on the stdlib corpus, on one machine, in minutes."""

from __future__ import annotations

import dataclasses
import logging

from raytrain.config import Config
from raytrain.data.manifest import PreparedDataset
from raytrain.data.prepare import run_prepare_stage
from raytrain.data.stream import BatchOrder, stream_batches
from raytrain.data.tokenizer import load_tokenizer
from raytrain.data.tokenizer_stage import run_tokenizer_stage

log = logging.getLogger("raytrain")
DEMO_GLOBAL_BATCH = 16


def run_demo(config: Config) -> None:
    run_dir = config.run.dir
    tokenizer_dir = run_dir / "tokenizer"
    data_dir = run_dir / "data"
    data = config.data
    config = dataclasses.replace(
        config,
        data=dataclasses.replace(
            data,
            tokenizer=dataclasses.replace(data.tokenizer, out=str(tokenizer_dir), overwrite=True),
            prepare=dataclasses.replace(
                data.prepare, tokenizer=str(tokenizer_dir), out=str(data_dir), overwrite=True
            ),
        ),
    )
    log.info("demo [1/2] tokenizer on %s", ", ".join(data.source.inputs))
    run_tokenizer_stage(config)
    log.info("demo [2/2] token shards")
    run_prepare_stage(config)
    _show_first_batch(data_dir, tokenizer_dir, config.data.prepare.seed)
    print(f"\ndemo outputs in {run_dir}/")
    print(f"  tokenizer  {tokenizer_dir}/tokenizer.json")
    print(f"  dataset    {data_dir}/manifest.json  (train/ and val/ Parquet shards)")


def _show_first_batch(data_dir, tokenizer_dir, seed: int) -> None:
    dataset = PreparedDataset.open(data_dir)
    order = BatchOrder(dataset.split("train").num_rows, DEMO_GLOBAL_BATCH, seed)
    step, rows = next(stream_batches(dataset, order, num_steps=1))
    text = load_tokenizer(tokenizer_dir).decode(rows[0, :48].tolist())
    log.info("global batch %d: %s rows through Ray Data; row 0 begins %r", step, rows.shape, text)
