"""A Hugging Face folder of several safetensors shards read as it is (`hf:DIR`): under dp2 (FSDP) and tp2 each
rank reads only its slices and the model gives transformers' logits; a missing, truncated or mismatched shard
fails before anything runs, in one line naming the tensor or the file. convert from-hf and to-hf stream a tensor
at a time: the converted checkpoint holds exactly the weights the folder loads as, and loads under FSDP too.
Gloo processes, no Ray."""

import argparse
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from families import hf_model, save_family
from torch.distributed.checkpoint.api import CheckpointException

from raytrain.commands import convert_from_hf
from raytrain.config import load_config
from raytrain.errors import DataError
from raytrain.parallel.layout import build_layout, parallelize
from raytrain.parallel.materialize import materialize
from raytrain.parallel.pipeline import parts_on_meta
from raytrain.train.checkpoint import (
    DCP_METADATA,
    load_model,
    load_weights,
    read_checkpoint_meta,
    resolve_checkpoint,
    save_model,
)
from raytrain.train.hf_checkpoint import INDEX_FILE, HFTensorReader

# (layout, what it loads): the Hugging Face folder itself, or its conversion by `convert from-hf`
LAYOUTS = {"fsdp2": (["parallel.dp_shard=2"], "hf"), "tp2": (["parallel.tp=2"], "hf"),
           "fsdp2-converted": (["parallel.dp_shard=2"], "converted")}
TOKENS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A llama (llama3 rope) saved by transformers in shards of at most 40 kB, with its index."""
    folder = tmp_path_factory.mktemp("llama-hf")
    hf = save_family("llama", folder, tie_word_embeddings=False)
    hf.save_pretrained(folder, max_shard_size="40KB")
    with torch.no_grad():
        logits = hf(TOKENS).logits
    return folder, logits


def rank_logits(rank: int, folder: str, hf_dir: str, converted: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    try:
        meta = read_checkpoint_meta(f"hf:{hf_dir}")
        for layout, (overrides, source) in LAYOUTS.items():
            config = load_config("tiny", [*overrides, "parallel.workers=2", "parallel.sequence_parallel=false",
                                          "parallel.loss_parallel=false"]).with_values({"model": meta["model"]})
            mesh = build_layout(config.parallel, 2, torch.device("cpu"))
            ((_, part),) = parts_on_meta(config.model, config.parallel, 0)
            module = parallelize(part, config.parallel, mesh, torch.device("cpu"), bf16=False,
                                 fill=lambda p: materialize(p, torch.device("cpu"), 0))
            load_weights(f"hf:{hf_dir}" if source == "hf" else converted, module)
            held = sum(p.to_local().numel() for p in part.parameters())
            with torch.no_grad():
                logits = module(TOKENS)
            logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
            torch.save((logits, held), f"{folder}/{layout}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_folder_loads_under_fsdp_and_tp_with_transformers_logits(sharded, tmp_path):
    hf_dir, expected = sharded
    convert_from_hf(argparse.Namespace(hf_dir=str(hf_dir), out=str(tmp_path / "converted")))
    assert len(list(hf_dir.glob("*.safetensors"))) > 3 and (hf_dir / INDEX_FILE).is_file()
    assert resolve_checkpoint(hf_dir) == f"hf:{hf_dir.absolute()}"  # detected without the prefix too
    model, meta = load_model(f"hf:{hf_dir}")  # one process: generate, eval, export
    assert meta["model"]["rope_scaling"] == "llama3" and meta["head"] == "lm"
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), expected, atol=1e-5, rtol=0)
    whole = model.num_params()
    mp.spawn(rank_logits, args=(str(tmp_path), str(hf_dir), str(tmp_path / "converted")), nprocs=2)
    for layout in LAYOUTS:
        for rank in range(2):
            logits, held = torch.load(tmp_path / f"{layout}-{rank}.pt")
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
            assert held < 0.6 * whole, (layout, held, whole)  # each rank holds about half


def test_missing_truncated_or_mismatched_shards_fail_in_one_line(sharded, tmp_path):
    hf_dir, _ = sharded
    model, _ = load_model(f"hf:{hf_dir}")

    def broken(name: str):
        folder = tmp_path / name
        shutil.copytree(hf_dir, folder)
        return folder

    files = sorted(hf_dir.glob("*.safetensors"))
    missing = broken("missing")
    (missing / files[1].name).unlink()
    truncated = broken("truncated")
    data = (truncated / files[2].name).read_bytes()
    (truncated / files[2].name).write_bytes(data[: len(data) // 2])
    wrong = broken("wrong")
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    cases = {missing: f"shard {files[1].name} \\(named by {INDEX_FILE}\\) is missing",
             truncated: f"{files[2].name}: not a readable safetensors file .*incomplete",
             wrong: "tensor model.layers.0.mlp.(gate|up|down)_proj.weight has shape .* but config.json's model needs"}
    for folder, message in cases.items():
        with pytest.raises(DataError, match=message) as error:
            load_weights(f"hf:{folder}", model)
        assert "\n" not in str(error.value)
        # convert from-hf checks the same before it writes anything
        with pytest.raises(DataError, match=message):
            convert_from_hf(argparse.Namespace(hf_dir=str(folder), out=str(tmp_path / "out")))
        assert not (tmp_path / "out").exists()


def test_from_hf_writes_exactly_the_weights_the_folder_loads_as(sharded, tmp_path, monkeypatch):
    """Streamed a tensor at a time, the checkpoint is the one save_model writes of the loaded model (the same DCP
    entries) with the same values: bf16 files cast to our fp32 per tensor, a tied head read from the embedding, a
    reward head the folder lacks started fresh. A failure midway leaves no folder."""
    hf_dir, _ = sharded
    tied = hf_model("qwen2").to(torch.bfloat16)  # tied embeddings, q/k/v biases
    tied.save_pretrained(tmp_path / "qwen2-hf", max_shard_size="20KB")
    reward = tmp_path / "reward-hf"  # the same trunk as a one-label classifier with no score.weight yet
    shutil.copytree(tmp_path / "qwen2-hf", reward)
    config = json.loads((reward / "config.json").read_text())
    (reward / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForSequenceClassification"]}))
    for folder in (hf_dir, tmp_path / "qwen2-hf", reward):
        out = tmp_path / f"{folder.name}-converted"
        convert_from_hf(argparse.Namespace(hf_dir=str(folder), out=str(out)))
        expected, meta = load_model(f"hf:{folder}")
        converted, converted_meta = load_model(out)
        assert converted_meta == {"format": converted_meta["format"], **meta}
        assert len(list(out.glob("*.distcp"))) > 3  # a file per tensor
        save_model(tmp_path / f"{folder.name}-saved", expected, meta)  # the whole model in memory, as before
        entries = [dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
                   for path in (out, tmp_path / f"{folder.name}-saved")]
        assert entries[0] == entries[1]
        for name, value in expected.state_dict().items():
            got = converted.state_dict()[name]
            assert got.dtype == value.dtype == torch.float32
            assert torch.equal(got, value) if not name.startswith("score.") else got.shape == value.shape, name
    assert converted.score is not None and converted.score.weight.abs().sum() > 0

    calls = []

    def fails_midway(self, write_item):
        calls.append(write_item)
        if len(calls) == 5:
            raise OSError("disk full")
        return original(self, write_item)

    original = HFTensorReader.resolve_data
    monkeypatch.setattr(HFTensorReader, "resolve_data", fails_midway)
    with pytest.raises(CheckpointException, match="disk full"):  # DCP's wrapping of it
        convert_from_hf(argparse.Namespace(hf_dir=str(hf_dir), out=str(tmp_path / "midway")))
    assert not (tmp_path / "midway").exists()


PEAK_SCRIPT = """
import argparse, sys
from raytrain.commands import convert_from_hf
from raytrain.config import load_config
from raytrain.data.prepare import tokenizer_info  # what convert_from_hf imports when it runs: in the baseline
from raytrain.train.memory import host_peak_rss_gib
load_config("demo", [])
baseline = host_peak_rss_gib()
convert_from_hf(argparse.Namespace(hf_dir=sys.argv[1], out=sys.argv[2]))
print("PEAK", (host_peak_rss_gib() - baseline) * 2**30)
"""


def test_from_hf_holds_about_one_tensor_not_the_model(tmp_path):
    """A 200 MB model in four shards converts in a fresh process whose peak resident memory grows by about its
    largest tensor (16 MB: the embedding), not by the model (the whole model loaded first took 1.35× its size)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408,
                                      num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=4,
                                      max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(tmp_path / "hf", max_shard_size="60MB")
    del model
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) >= 4
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(PEAK_SCRIPT), str(tmp_path / "hf"),
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    peak = float(result.stdout.split("PEAK")[-1])
    assert peak < 0.25 * model_bytes, (peak / 2**20, model_bytes / 2**20)
    assert (tmp_path / "out" / DCP_METADATA).is_file() and (tmp_path / "out" / "raytrain.json").is_file()


def test_to_hf_streams_a_checkpoint_into_shards_that_transformers_loads(sharded, tmp_path):
    from transformers import AutoModelForCausalLM

    from raytrain.export.hf import checkpoint_to_hf

    hf_dir, expected = sharded
    model, meta = load_model(f"hf:{hf_dir}")
    save_model(tmp_path / "ckpt", model, meta)
    # A tensor at a time into files of at most 40 kB (transformers' 5 GB by default), with the index.
    assert checkpoint_to_hf(str(tmp_path / "ckpt"), tmp_path / "out", shard_bytes=40_000) == "LlamaForCausalLM"
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    files = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 3 and set(index["weight_map"].values()) == {f.name for f in files}
    assert all(f.stat().st_size < 40_000 + 4 * 64 * 320 + 4096 for f in files)  # a tensor over the limit alone
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(TOKENS).logits, expected, atol=1e-5, rtol=0)
    with pytest.raises(DataError, match="is a Hugging Face folder already"):
        checkpoint_to_hf(f"hf:{hf_dir}", tmp_path / "again")
