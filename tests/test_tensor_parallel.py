"""Tensor parallelism's math in two gloo processes, without Ray: it matches one process."""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raytrain.config import load_config
from raytrain.model.transformer import Transformer
from raytrain.parallel.layout import build_layout, parallelize
from raytrain.parallel.tensor_parallel import loss_context
from raytrain.train.checkpoint import load_model, save_training_checkpoint
from raytrain.train.objectives import causal_lm, token_loss
from raytrain.train.optim import build_optimizer

# Sequence and loss parallel (the defaults) with a tied embedding: the head shares the embedding's shards.
OVERRIDES = ["model.tie_embeddings=true", "parallel.sequence_parallel=true", "parallel.loss_parallel=true"]


def one_step(world: int, checkpoint: str | None = None):
    """Loss, gradients and logits placement of one step; then an optimizer step, saved to `checkpoint`."""
    config = load_config("tiny", [*OVERRIDES, f"parallel.workers={world}", f"parallel.tp={world}"])
    model = Transformer(config.model)
    model.init_weights(0)
    layout = build_layout(config.parallel, world, torch.device("cpu"))
    module = parallelize(model, config.parallel, layout, torch.device("cpu"), bf16=False)
    optimizer = build_optimizer(model, config.train)
    inputs, targets = causal_lm(torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(1)))
    with loss_context(world > 1):
        logits = module(inputs)
        loss, count = token_loss(logits, targets)
        (loss / count).backward()
    grads = {name: p.grad.full_tensor() if world > 1 else p.grad for name, p in model.named_parameters()}
    optimizer.step()
    if checkpoint:
        save_training_checkpoint(Path(checkpoint), [model], [optimizer], {},
                                 {"model": vars(config.model), "head": "lm", "weights_prefix": ""},
                                 write_meta=dist.get_rank() == 0)
    return float(loss.detach() / count), grads, str(getattr(logits, "placements", None)), model


def tensor_parallel_rank(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    try:
        loss, grads, placements, model = one_step(2, checkpoint=f"{folder}/checkpoint")
        weights = {name: value.full_tensor() for name, value in model.state_dict().items()}
        if rank == 0:
            torch.save((loss, grads, placements, weights), f"{folder}/result.pt")
    finally:
        dist.destroy_process_group()


def test_sequence_and_loss_parallel_with_tied_embeddings_match_one_process(tmp_path):
    loss, grads, _, _ = one_step(1)
    mp.spawn(tensor_parallel_rank, args=(str(tmp_path),), nprocs=2)
    tp_loss, tp_grads, placements, tp_weights = torch.load(tmp_path / "result.pt")
    assert placements == "(Shard(dim=2),)"  # logits stay split over the vocabulary
    assert "lm_head.weight" not in grads and grads.keys() == tp_grads.keys()  # still tied
    assert abs(tp_loss - loss) < 1e-5
    for name, grad in grads.items():
        torch.testing.assert_close(tp_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The tp2 checkpoint after the step, loaded in one process: the tp2 model's weights, still tied.
    loaded, _ = load_model(tmp_path / "checkpoint")
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert loaded.state_dict().keys() == tp_weights.keys()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, tp_weights[name]), name
