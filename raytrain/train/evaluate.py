"""Sums over a prepared split: validation metrics of a training run or of any model (torch, or an ONNX export on
onnxruntime), and the reward model's score statistics."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from raytrain.data.manifest import PreparedDataset
from raytrain.data.stream import BatchOrder, stream_batches
from raytrain.errors import DataError
from raytrain.train.checkpoint import model_head
from raytrain.train.packing import model_call


@torch.no_grad()
def split_sums(dataset: PreparedDataset, objective, sums_of, *, batches: int, global_batch: int, consumer: int,
               num_consumers: int, device: torch.device, split: str = "val", ray_data: bool = True) -> torch.Tensor:
    """This consumer's share of the summed `sums_of(inputs, targets)` vectors over a split's first `batches`
    batches (0: all), in file order, each row read at most once.

    sums_of: [loss sum, count, …] of a plain forward or a pipeline schedule's (validation), or any other
    per-batch sums (the reward model's score statistics). A last batch that runs past the split's end wraps
    to its start; those rows are set to `objective.blank`, a row that contributes nothing (every rank still
    runs every batch, as sharded models need). Pre-training rows have no such value (their splits are large).
    """
    rows = dataset.split(split).num_rows
    order = BatchOrder(rows, global_batch, seed=0, shuffle=False)
    local = order.local_batch(num_consumers)
    whole = -(-rows // global_batch)
    totals = None
    for step, batch in stream_batches(dataset, order, split=split, consumer=consumer, num_consumers=num_consumers,
                                      num_steps=min(batches, whole) if batches else whole, ray_data=ray_data):
        if objective.blank is not None:
            batch[step * global_batch + consumer * local + np.arange(local) >= rows] = objective.blank
        inputs, targets = objective(torch.from_numpy(batch).long().to(device), step, consumer * local)
        sums = sums_of(inputs, targets).double()
        totals = sums if totals is None else totals + sums
    return totals


def with_reference(objective, reference: torch.nn.Module | None, inputs: torch.Tensor, targets,
                   compute=contextlib.nullcontext):
    """(inputs, targets), the targets completed with a frozen reference model's outputs when the objective asks."""
    if reference is None:
        return inputs, targets
    with torch.no_grad(), compute():
        return inputs, objective.with_reference(targets, model_call(reference, inputs, objective.causal))


def with_reference_point(objective, policy: torch.nn.Module, reference: torch.nn.Module | None, pairs: list,
                         compute, reduce) -> list:
    """Every micro-batch's (inputs, targets), the targets completed with a statistic of the whole global batch when
    the objective asks (KTO's reference point: the policy and the reference on each row's mismatched pair, summed
    over the micro-batches and `reduce`d over the data-parallel ranks), so that it is the same under any layout."""
    if not objective.reference_point:
        return pairs
    with torch.no_grad(), compute():
        sums = sum(objective.kl_sums(model_call(policy, t.kl_inputs, objective.causal),
                                     model_call(reference, t.kl_inputs, objective.causal), t) for _, t in pairs)
    totals = reduce(sums)
    return [(inputs, objective.with_point(targets, totals)) for inputs, targets in pairs]


def forward_loss_sums(module: torch.nn.Module, objective, compute=contextlib.nullcontext,
                      reference: torch.nn.Module | None = None, reduce=lambda sums: sums):
    """sums_of for a model that is not pipelined: [loss sum, count, …]; compute() is the context it runs in,
    reduce() sums a global-batch statistic over the data-parallel ranks (with_reference_point)."""

    def sums_of(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        inputs, targets = with_reference(objective, reference, inputs, targets, compute)
        ((inputs, targets),) = with_reference_point(objective, module, reference, [(inputs, targets)], compute, reduce)
        with compute():
            loss, sums = objective.loss(model_call(module, inputs, objective.causal), targets)
        return torch.cat([loss.detach().double().reshape(1), sums])

    return sums_of


def unigram_baseline(dataset: PreparedDataset) -> float:
    """Cross-entropy (nats/token) on val of the train split's token frequencies: the bar to beat."""
    from raytrain.data.stream import read_rows

    train, val = dataset.split("train"), dataset.split("val")
    vocab = dataset.manifest["tokenizer"]["vocab_size"]
    counts = np.bincount(read_rows(train, np.arange(train.num_rows), dataset.row_len).reshape(-1), minlength=vocab)
    log_probs = np.log((counts + 1) / (counts.sum() + vocab))  # add-one: unseen tokens stay finite
    val_tokens = read_rows(val, np.arange(val.num_rows), dataset.row_len)[:, 1:].reshape(-1)
    return float(-log_probs[val_tokens].mean())


def check_evaluation_data(meta: dict, dataset: PreparedDataset) -> None:
    """A checkpoint is evaluated on data of its kind, tokenized with its tokenizer."""
    reward = model_head(meta) == "score"
    if reward != (dataset.kind == "prefs"):
        wanted = "`raytrain data prefs`" if reward else "`raytrain data prepare` or `raytrain data sft`"
        raise DataError(f"'{dataset.root}' holds {dataset.kind} data; a {'reward' if reward else 'language'} "
                        f"model is evaluated on {wanted} output")
    if dataset.manifest["tokenizer"]["sha256"] != meta["tokenizer"]["sha256"]:
        raise DataError(f"'{dataset.root}' was tokenized differently from the checkpoint's training data; "
                        "evaluate on data prepared with the same tokenizer")
