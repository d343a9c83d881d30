"""`raytrain plan`: the real parallel plan applied on the meta device over a fake process group."""

import re
from argparse import Namespace

import pytest

from raytrain.cli import main
from raytrain.commands import plan_report
from raytrain.config import load_config
from raytrain.errors import ConfigError
from raytrain.parallel.plan import plan_ranks


def run_plan(config: str, world: int, *overrides: str, seq_len: int | None = None) -> str:
    return plan_report(Namespace(config=config, world=world, seq_len=seq_len, gpu_memory=80.0, peak_tflops=989.0,
                                 mfu=0.4, overrides=list(overrides)))[0]


def replica_sum(text: str) -> tuple[str, str]:
    line = next(x for x in text.splitlines() if x.startswith("parameters over the ranks of one replica"))
    counted, total = re.search(r"once: ([\d,]+) \(model: ([\d,]+)\)", line).groups()
    return counted, total


def test_8b_preset_on_64_ranks_fits_and_counts_every_parameter():
    text = run_plan("llama-8b", 64)
    counted, total = replica_sum(text)
    assert counted == total == "8,030,261,248"
    assert "fits with 10% headroom" in text and "tokens/s" in text


def test_3d_layout_counts_replicated_parameters_once():
    # Norm weights are replicated over tp; embedding and head live on the first and last stage only.
    text = run_plan("tiny", 8, "parallel.pp=2", "parallel.tp=2", "train.micro_batches=2", "train.global_batch=8")
    counted, total = replica_sum(text)
    assert counted == total
    assert "pipeline bubble 33%" in text


def test_replicated_layout_counts_each_parameter_on_every_replica():
    text = run_plan("tiny", 2, "parallel.dp_replicate=2")  # plain DDP
    counted, total = replica_sum(text)
    assert counted == total == "94,496"
    plans = plan_ranks(load_config("tiny", ["parallel.workers=2", "parallel.dp_replicate=2"]), 2, seq_len=32)
    assert [p.params for p in plans] == [94_496, 94_496] and all(p.fsdp_buffer_gib == 0 for p in plans)


def test_a_layout_that_cannot_split_the_model():
    with pytest.raises(ConfigError, match="model.n_kv_heads=2 is not divisible by parallel.tp=4"):
        run_plan("tiny", 4, "parallel.tp=4")
    with pytest.raises(ConfigError, match="fewer than pp × pp_virtual_stages = 8 stages"):
        run_plan("tiny", 8, "parallel.pp=8", "train.micro_batches=8", "train.global_batch=8")
    with pytest.raises(ConfigError, match="set model.tie_embeddings=false"):
        run_plan("tiny", 2, "parallel.pp=2", "train.micro_batches=2", "model.tie_embeddings=true")
    with pytest.raises(ConfigError, match="sequence length 31 is not divisible by parallel.tp=2"):
        run_plan("tiny", 2, "parallel.tp=2", seq_len=31)
    run_plan("tiny", 2, "parallel.tp=2", "parallel.sequence_parallel=false", seq_len=31)


def test_the_command_exits_non_zero_when_the_layout_does_not_fit(capsys):
    assert main(["plan", "--config", "llama-8b", "--world", "64"]) == 0
    assert "fits with 10% headroom" in capsys.readouterr().out
    assert main(["plan", "--config", "llama-8b", "--world", "8"]) == 1  # 8B with 64-rank settings on one node
    assert "does NOT fit" in capsys.readouterr().out
