"""`raytrain export onnx CKPT|RUN --out DIR`: a checkpoint → a self-contained folder for onnxruntime, and what
the export kept of the model (logit parity, held-out perplexity or accuracy, greedy agreement, speed)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

import raytrain
from raytrain import storage
from raytrain.data.manifest import MANIFEST_FILE, PreparedDataset
from raytrain.data.output import local_output_dir
from raytrain.data.tokenizer import copy_tokenizer, load_tokenizer
from raytrain.errors import DataError
from raytrain.export.folder import CONFIG_FILE, read_config, write_config
from raytrain.export.graphs import export_graphs
from raytrain.export.quality import (
    NEW_TOKENS,
    greedy_agreement,
    onnx_runner,
    parity_error,
    score_parity_error,
    tokens_per_second,
    torch_runner,
    validation_prompts,
)
from raytrain.export.quantize import QUANTIZATIONS, quantize
from raytrain.export.runtime import OnnxModel
from raytrain.inference import validation_metrics
from raytrain.train.checkpoint import checkpoint_tokenizer, load_model, model_head, resolve_checkpoint
from raytrain.train.evaluate import check_evaluation_data

PARITY_LIMIT = 1e-4  # |logit difference| the fp32 graphs may show against the model
PROTOBUF_LIMIT = 2 << 30  # one ONNX file holds at most 2 GiB inline
PROMPTS = 16  # validation prompts the agreement and speed are measured on


def export_command(args: argparse.Namespace) -> dict:
    """`raytrain export onnx`'s arguments → export_onnx."""
    return export_onnx(args.checkpoint, args.out, quantization=args.quantize, data=args.data, batches=args.batches,
                       batch_size=args.batch_size, tokenizer=args.tokenizer, overwrite=args.overwrite)


def export_onnx(source: str, out: str, *, quantization: str = "none", data: str | None = None, batches: int = 8,
                batch_size: int = 16, tokenizer: str | None = None, overwrite: bool = False) -> dict:
    """A checkpoint or run folder → the export folder `out` (appears only when complete); prints and returns
    what the export kept of the model, measured on `data` (default: the checkpoint's own prepared data)."""
    if quantization not in QUANTIZATIONS:
        raise DataError(f"unknown --quantize {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    started = time.perf_counter()
    checkpoint = resolve_checkpoint(source)
    model, meta = load_model(checkpoint)
    if meta.get("objective") == "masked":
        raise DataError(f"'{checkpoint}' is a masked language model; export takes causal language models "
                        "(pre-trained, SFT, DPO, PPO) and reward models")
    if 4 * model.num_params() >= PROTOBUF_LIMIT:
        raise DataError(f"'{checkpoint}' has {model.num_params():,} parameters: over 2 GiB in fp32, which needs "
                        "ONNX external data files; export does not write those yet")
    tokenizer_dir = checkpoint_tokenizer(meta, tokenizer)
    dataset = PreparedDataset.open(data) if data else default_dataset(meta)
    if dataset is not None:
        check_evaluation_data(meta, dataset)
    skipped = ""
    if dataset is not None and dataset.split("val").num_rows == 0:
        if data:
            raise DataError(f"--data '{data}' has no held-out (val) rows to measure the export on; prepare it with "
                            "data.prepare.val_fraction > 0, or leave --data out")
        skipped = f"the checkpoint's data '{dataset.root}' has no held-out (val) rows"
        dataset = None
    with local_output_dir(out, CONFIG_FILE, overwrite) as staging, \
            tempfile.TemporaryDirectory(prefix="raytrain-fp32-") as scratch:
        fp32 = staging if quantization == "none" else Path(scratch)
        graphs = export_graphs(model, fp32)
        finish_folder(fp32, graphs, "none", model, meta, checkpoint, tokenizer_dir)
        summary = {"quantization": quantization, "fp32_bytes": folder_bytes(fp32, graphs)}
        reference = OnnxModel(fp32)
        pad = reference.export["special_tokens"]["pad"]
        check = parity_error if model.score is None else score_parity_error
        summary["parity"] = check(model, reference, [[0, 5, 9, 11, 13], [0, 7, 8]], pad)
        if summary["parity"] > PARITY_LIMIT:
            raise RuntimeError(f"the fp32 graphs differ from the model by up to {summary['parity']:.2e} (limit "
                               f"{PARITY_LIMIT}): an export bug, please report it")
        if quantization != "none":
            for name in graphs:
                quantize(fp32 / name, staging / name, quantization)
            finish_folder(staging, graphs, quantization, model, meta, checkpoint, tokenizer_dir)
        summary["bytes"] = folder_bytes(staging, graphs)
        summary.update(measure(model, OnnxModel(staging), dataset, batches, batch_size))
        config = read_config(staging)
        write_config(staging, {**{k: v for k, v in config.items() if k != "format"}, "quality": summary})
    summary["wall_s"] = time.perf_counter() - started
    print_summary(summary, checkpoint, out, list(graphs), dataset, skipped)
    return summary


def default_dataset(meta: dict) -> PreparedDataset | None:
    """The checkpoint's own training data when it is a prepared folder (a PPO run's prompts are not)."""
    data = str(meta.get("data", ""))
    return PreparedDataset.open(data) if data and storage.is_file(storage.join(data, MANIFEST_FILE)) else None


def finish_folder(folder: Path, graphs: dict, quantization: str, model, meta: dict, checkpoint: Path,
                  tokenizer_dir: str | Path) -> None:
    """The tokenizer beside the graphs, then raytrain-onnx.json (the folder is complete once it exists)."""
    copy_tokenizer(tokenizer_dir, folder)
    write_config(folder, {
        "raytrain_version": raytrain.__version__,
        "head": model_head(meta),
        "quantization": quantization,
        "graphs": graphs,
        "max_length": model.config.max_seq_len,
        "special_tokens": load_tokenizer(folder).special,
        "chat_template": "tokenizer_config.json",
        "model": vars(model.config),
        "checkpoint": {**meta, "path": str(checkpoint)},
        "exported_with": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
    })


def folder_bytes(folder: Path, graphs: dict) -> int:
    return sum((folder / name).stat().st_size for name in graphs)


def measure(model, exported: OnnxModel, dataset: PreparedDataset | None, batches: int, batch_size: int) -> dict:
    """The export against the torch fp32 model: held-out metrics (with data), and for a language model greedy
    agreement and generation speed on the validation prompts (the bos token alone without data)."""
    result = {}
    if dataset is not None:
        metric = "val/accuracy" if exported.head == "score" else "val/ppl"
        result["metric"] = metric
        reference, result["count"] = validation_metrics(model, exported.meta, dataset, batches, batch_size)
        result["fp32"] = reference[metric]
        result["exported"] = validation_metrics(exported, exported.meta, dataset, batches, batch_size)[0][metric]
    if exported.head == "score":
        return result
    special = exported.export["special_tokens"]
    start = special["bos"] if special["bos"] is not None else special["eos"]  # a document's start without data
    prompts = (validation_prompts(dataset, PROMPTS, exported.export["max_length"])
               if dataset is not None else [[start]] * PROMPTS)
    result["torch_tokens_per_s"], reference = tokens_per_second(torch_runner(model, special["pad"]), prompts,
                                                                NEW_TOKENS)
    result["onnx_tokens_per_s"], outputs = tokens_per_second(onnx_runner(exported, special["pad"]), prompts,
                                                             NEW_TOKENS)
    result["agreement"], result["identical"] = greedy_agreement(reference, outputs)
    result["prompts"] = len(prompts)
    return result


def print_summary(summary: dict, checkpoint: Path, out: str, graphs: list[str], dataset, skipped: str = "") -> None:
    method = summary["quantization"]
    name = "fp32" if method == "none" else method
    size = summary["bytes"] / 1e6
    versus = "" if method == "none" else (f"; fp32 {summary['fp32_bytes'] / 1e6:.1f} MB, "
                                          f"{summary['fp32_bytes'] / summary['bytes']:.1f}× smaller")
    print(f"exported {checkpoint} → {out}: {' + '.join(graphs)}, {name}, {size:.1f} MB{versus} "
          f"({summary['wall_s']:.0f}s)")
    checked = "score" if "agreement" not in summary else "logit"
    steps = "" if checked == "score" else " (prefill + 3 decode steps)"
    print(f"  fp32 graphs against the model: max |Δ{checked}| {summary['parity']:.1e}{steps}")
    if "metric" in summary:
        fp32, ours = summary["fp32"], summary["exported"]
        label = {"val/ppl": "held-out perplexity", "val/accuracy": "held-out pairwise accuracy"}[summary["metric"]]
        unit = "answer tokens" if dataset.kind == "sft" else "ranked pairs" if dataset.kind == "prefs" else "tokens"
        print(f"  {label} PyTorch fp32 {fp32:.3f} → onnxruntime {name} {ours:.3f} ({ours / fp32 - 1:+.2%}) on "
              f"{summary['count']:,} {unit} of {dataset.root}")
    else:
        why = f"quality check on held-out data skipped: {skipped}; " if skipped else ""
        print(f"  {why}pass --data DIR (a prepared dataset with val rows) to compare held-out perplexity with the "
              "fp32 model")
    if "agreement" in summary:
        print(f"  greedy tokens equal to PyTorch fp32's: {summary['agreement']:.1%} before the first difference, "
              f"{summary['identical']} of {summary['prompts']} continuations identical ({NEW_TOKENS} tokens each)")
        print(f"  generation, one prompt at a time ({summary['prompts']} × {NEW_TOKENS} tokens): PyTorch fp32 "
              f"(KV cache) {summary['torch_tokens_per_s']:,.0f} tokens/s → onnxruntime {name} "
              f"{summary['onnx_tokens_per_s']:,.0f} tokens/s "
              f"({summary['onnx_tokens_per_s'] / summary['torch_tokens_per_s']:.2f}×)")
