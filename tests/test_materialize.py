"""Models built on the meta device and materialized shard by shard hold, under every layout, the values the whole
model's seeded init gives: four gloo processes, no Ray."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raytrain.config import load_config
from raytrain.model.transformer import Transformer
from raytrain.parallel.layout import build_layout, parallelize
from raytrain.parallel.materialize import materialize
from raytrain.parallel.pipeline import parts_on_meta

# Each with activation checkpointing (its wrapper renames blocks) and a tied embedding where the layout allows.
LAYOUTS = {
    "fsdp4": ["parallel.dp_shard=4", "model.tie_embeddings=true"],
    "hsdp2x2": ["parallel.dp_replicate=2", "parallel.dp_shard=2"],
    "fsdp2-tp2": ["parallel.dp_shard=2", "parallel.tp=2", "model.tie_embeddings=true"],
    "pp2-tp2-uneven": ["parallel.pp=2", "parallel.tp=2", "parallel.pp_layers=[1, 3]"],
    "ddp4": ["parallel.dp_replicate=4"],
}
SEED = 3


def config_of(layout: str):
    return load_config("tiny", [*LAYOUTS[layout], "parallel.workers=4", "parallel.activation_checkpointing=full",
                                "model.vocab_size=510"])  # a vocabulary FSDP shards unevenly


def build_rank(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=4)
    try:
        for layout in LAYOUTS:
            config = config_of(layout)
            mesh = build_layout(config.parallel, 4, torch.device("cpu"))
            values = {}
            for _, part in parts_on_meta(config.model, config.parallel, mesh.pp_rank):
                parallelize(part, config.parallel, mesh, torch.device("cpu"), bf16=False,
                            fill=lambda p: materialize(p, torch.device("cpu"), SEED))
                for name, param in part.named_parameters():
                    full = param.full_tensor() if hasattr(param, "full_tensor") else param.detach()
                    values[name.replace("_checkpoint_wrapped_module.", "")] = full.clone()
                assert torch.equal(part.rope_cos, Transformer(config.model).rope_cos)
            torch.save(values, f"{folder}/{layout}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_layout_materializes_the_whole_models_seeded_values(tmp_path):
    mp.spawn(build_rank, args=(str(tmp_path),), nprocs=4)
    for layout in LAYOUTS:
        config = config_of(layout)
        whole = Transformer(config.model)
        whole.init_weights(SEED)
        expected = dict(whole.named_parameters())
        held = [torch.load(tmp_path / f"{layout}-{rank}.pt") for rank in range(4)]
        assert set().union(*held) == set(expected), layout  # every parameter is held somewhere
        for rank_values in held:
            for name, value in rank_values.items():
                assert torch.equal(value, expected[name]), (layout, name)
