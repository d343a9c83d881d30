"""`raytrain export onnx CKPT|RUN --out DIR`: a checkpoint → a self-contained folder for onnxruntime, and what
the export kept of the model (logit parity, held-out perplexity or accuracy, greedy agreement, speed).

A model of any size: the graphs keep their weights in one shared file (folder.py). The host holds the model and
one graph at a time: the exported program while exporting, one onnxruntime session while checking and measuring;
before quantizing it frees the model, as onnxruntime's quantizer needs the memory (docs/export.md: the figures)."""

from __future__ import annotations

import argparse
import gc
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
from raytrain.export.folder import CONFIG_FILE, folder_bytes, read_config, write_config
from raytrain.export.graphs import PREFILL, export_graphs
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
from raytrain.export.quantize import QUANTIZATIONS, quantize_folder
from raytrain.export.runtime import OnnxModel
from raytrain.inference import validation_metrics
from raytrain.model.config import TransformerConfig
from raytrain.train.checkpoint import checkpoint_tokenizer, load_model, model_head, resolve_checkpoint
from raytrain.train.evaluate import check_evaluation_data

PARITY_LIMIT = 1e-4  # |logit difference| the fp32 graphs may show against the model
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
    model_config = model.config
    with local_output_dir(out, CONFIG_FILE, overwrite) as staging, \
            tempfile.TemporaryDirectory(prefix="raytrain-fp32-") as scratch:
        fp32 = staging if quantization == "none" else Path(scratch)
        graphs = export_graphs(model, fp32)
        finish_folder(fp32, graphs, "none", model_config, meta, checkpoint, tokenizer_dir)
        summary = {"quantization": quantization, "fp32_bytes": folder_bytes(fp32, graphs)}
        rows = [[0, 5, 9, 11, 13], [0, 7, 8]]
        pad = load_tokenizer(fp32).special["pad"]
        if model.score is None:  # prefill.onnx alone, then decode.onnx (what OnnxModel runs): one in memory
            parity = parity_error(model, OnnxModel(fp32, graphs=(PREFILL,)), rows, pad, steps=0)
            exported = OnnxModel(fp32)
            summary["parity"] = max(parity, parity_error(model, exported, rows, pad))
        else:
            exported = OnnxModel(fp32)
            summary["parity"] = score_parity_error(model, exported, rows, pad)
        if summary["parity"] > PARITY_LIMIT:
            raise RuntimeError(f"the fp32 graphs differ from the model by up to {summary['parity']:.2e} (limit "
                               f"{PARITY_LIMIT}): an export bug, please report it")
        baseline, reference = measure_model(model, exported, dataset, batches, batch_size)
        if quantization != "none":
            # The torch model's part is done: the quantizer gets its memory (onnxruntime's holds two to three
            # copies of a graph's fp32 weights). Emptied, not just dropped: the exporter keeps the last graph it
            # optimized (onnxscript's rewrite rules hold it), and with it the parameters.
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.data = torch.empty(0)
            del exported, model
            gc.collect()
            quantize_folder(fp32, staging, graphs, quantization)
            finish_folder(staging, graphs, quantization, model_config, meta, checkpoint, tokenizer_dir)
            exported = OnnxModel(staging)
        summary["bytes"] = folder_bytes(staging, graphs)
        summary.update(measure_export(exported, baseline, reference, dataset, batches, batch_size))
        del exported
        config = read_config(staging)
        write_config(staging, {**{k: v for k, v in config.items() if k != "format"}, "quality": summary})
    summary["wall_s"] = time.perf_counter() - started
    print_summary(summary, checkpoint, out, list(graphs), dataset, skipped)
    return summary


def default_dataset(meta: dict) -> PreparedDataset | None:
    """The checkpoint's own training data when it is a prepared folder (a PPO run's prompts are not)."""
    data = str(meta.get("data", ""))
    return PreparedDataset.open(data) if data and storage.is_file(storage.join(data, MANIFEST_FILE)) else None


def finish_folder(folder: Path, graphs: dict, quantization: str, config: TransformerConfig, meta: dict,
                  checkpoint: Path, tokenizer_dir: str | Path) -> None:
    """The tokenizer beside the graphs, then raytrain-onnx.json (the folder is complete once it exists)."""
    copy_tokenizer(tokenizer_dir, folder)
    write_config(folder, {
        "raytrain_version": raytrain.__version__,
        "head": model_head(meta),
        "quantization": quantization,
        "graphs": graphs,
        "max_length": config.max_seq_len,
        "special_tokens": load_tokenizer(folder).special,
        "chat_template": "tokenizer_config.json",
        "model": vars(config),
        "checkpoint": {**meta, "path": str(checkpoint)},
        "exported_with": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
    })


def measure_model(model, exported: OnnxModel, dataset: PreparedDataset | None, batches: int, batch_size: int
                  ) -> tuple[dict, list[list[int]]]:
    """The torch fp32 model on what its export is measured on (`exported`: the folder's tokens and limits): its
    held-out metric (with data), and a language model's generation speed; and its greedy tokens."""
    result: dict = {}
    if dataset is not None:
        result["metric"] = "val/accuracy" if exported.head == "score" else "val/ppl"
        reference, result["count"] = validation_metrics(model, exported.meta, dataset, batches, batch_size)
        result["fp32"] = reference[result["metric"]]
    if exported.head == "score":
        return result, []
    pad = exported.export["special_tokens"]["pad"]
    result["torch_tokens_per_s"], tokens = tokens_per_second(torch_runner(model, pad),
                                                             measured_prompts(exported, dataset), NEW_TOKENS)
    return result, tokens


def measure_export(exported: OnnxModel, baseline: dict, reference: list[list[int]], dataset: PreparedDataset | None,
                   batches: int, batch_size: int) -> dict:
    """The export against the torch fp32 model (`baseline`, `reference`: measure_model's): held-out metrics (with
    data), and for a language model greedy agreement and generation speed on the validation prompts (the bos
    token alone without data)."""
    result = dict(baseline)
    if dataset is not None:
        result["exported"] = validation_metrics(exported, exported.meta, dataset, batches,
                                                batch_size)[0][result["metric"]]
    if exported.head == "score":
        return result
    prompts = measured_prompts(exported, dataset)
    result["onnx_tokens_per_s"], outputs = tokens_per_second(onnx_runner(exported, exported.export[
        "special_tokens"]["pad"]), prompts, NEW_TOKENS)
    result["agreement"], result["identical"] = greedy_agreement(reference, outputs)
    result["prompts"] = len(prompts)
    return result


def measured_prompts(exported: OnnxModel, dataset: PreparedDataset | None) -> list[list[int]]:
    """PROMPTS validation prompts, or without data the bos token alone (a document's start)."""
    special = exported.export["special_tokens"]
    start = special["bos"] if special["bos"] is not None else special["eos"]
    return (validation_prompts(dataset, PROMPTS, exported.export["max_length"]) if dataset is not None
            else [[start]] * PROMPTS)


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
