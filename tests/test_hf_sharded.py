"""A Hugging Face folder of several safetensors shards read as it is (`hf:DIR`): under dp2 (FSDP) and tp2 each
rank reads only its slices and the model gives transformers' logits; a missing, truncated or mismatched shard
fails before anything runs, in one line naming the tensor or the file. Gloo processes, no Ray."""

import json
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from families import save_family

from raytrain.config import load_config
from raytrain.errors import DataError
from raytrain.parallel.layout import build_layout, parallelize
from raytrain.parallel.materialize import materialize
from raytrain.parallel.pipeline import parts_on_meta
from raytrain.train.checkpoint import load_model, load_weights, read_checkpoint_meta, resolve_checkpoint
from raytrain.train.hf_checkpoint import INDEX_FILE

LAYOUTS = {"fsdp2": ["parallel.dp_shard=2"], "tp2": ["parallel.tp=2"]}
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


def rank_logits(rank: int, folder: str, hf_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    try:
        meta = read_checkpoint_meta(f"hf:{hf_dir}")
        for layout, overrides in LAYOUTS.items():
            config = load_config("tiny", [*overrides, "parallel.workers=2", "parallel.sequence_parallel=false",
                                          "parallel.loss_parallel=false"]).with_values({"model": meta["model"]})
            mesh = build_layout(config.parallel, 2, torch.device("cpu"))
            ((_, part),) = parts_on_meta(config.model, config.parallel, 0)
            module = parallelize(part, config.parallel, mesh, torch.device("cpu"), bf16=False,
                                 fill=lambda p: materialize(p, torch.device("cpu"), 0))
            load_weights(f"hf:{hf_dir}", module)
            held = sum(p.to_local().numel() for p in part.parameters())
            with torch.no_grad():
                logits = module(TOKENS)
            logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
            torch.save((logits, held), f"{folder}/{layout}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_folder_loads_under_fsdp_and_tp_with_transformers_logits(sharded, tmp_path):
    hf_dir, expected = sharded
    assert len(list(hf_dir.glob("*.safetensors"))) > 3 and (hf_dir / INDEX_FILE).is_file()
    assert resolve_checkpoint(hf_dir) == f"hf:{hf_dir.absolute()}"  # detected without the prefix too
    model, meta = load_model(f"hf:{hf_dir}")  # one process: generate, eval, export
    assert meta["model"]["rope_scaling"] == "llama3" and meta["head"] == "lm"
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), expected, atol=1e-5, rtol=0)
    whole = model.num_params()
    mp.spawn(rank_logits, args=(str(tmp_path), str(hf_dir)), nprocs=2)
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


def test_to_hf_streams_a_checkpoint_into_shards_that_transformers_loads(sharded, tmp_path):
    from transformers import AutoModelForCausalLM

    from raytrain.export.hf import checkpoint_to_hf
    from raytrain.train.checkpoint import save_model

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
