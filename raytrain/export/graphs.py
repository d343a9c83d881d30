"""A model's ONNX graphs, exported with PyTorch's exporter (`torch.onnx.export`, dynamo).

A language model becomes two graphs with Hugging Face's inputs and outputs (as optimum and onnxruntime-genai
export Llama), so the usual KV-cache loop drives them:

    prefill.onnx  input_ids [batch, seq], attention_mask [batch, seq], position_ids [batch, seq]
                  → logits [batch, seq, vocab], present.L.key / present.L.value [batch, kv_heads, seq, head_dim]
    decode.onnx   the same, plus past.L.key / past.L.value [batch, kv_heads, past_seq, head_dim], with
                  attention_mask [batch, past_seq + seq]; present = past followed by this step's keys and values

attention_mask is 1 for real tokens and 0 for (left) padding; position_ids count real tokens only. Both graphs
are our own Transformer's forward, so they are the model, not a re-implementation of it.

A reward model becomes score.onnx: input_ids, attention_mask [batch, seq] (right-padded) → scores [batch], each
row's score at its last real token, and position_scores [batch, seq].

The graphs keep their weights in the folder's one weights file (folder.py: a model of any size, as protobuf holds
2 GiB at most), written a tensor at a time straight from the exported program, each distinct tensor once: the
decode graph's weights are the prefill graph's. The host holds the model and one exported program at a time.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings
from pathlib import Path

import onnx_ir as ir
import torch
from torch import nn

from raytrain.export.folder import INLINE_BYTES, WEIGHTS_FILE, WeightsFile
from raytrain.model.transformer import Transformer

PREFILL, DECODE, SCORE = "prefill.onnx", "decode.onnx", "score.onnx"
# Opset 23 has the Attention (grouped-query, masked) and RMSNormalization ops: onnxruntime runs them as fused
# kernels, decoding 2-3× faster than opset 20's attention spelled out in MatMul, Softmax and Where.
OPSET = 23
AUTO = torch.export.Dim.AUTO


def cache_names(kind: str, layers: int) -> list[str]:
    """past.L.key, past.L.value, … (kind "past") or present.… for layers 0..layers-1."""
    return [f"{kind}.{layer}.{part}" for layer in range(layers) for part in ("key", "value")]


class ConcatCache:
    """The model's cache interface over given past keys/values: each layer's keys are the past ones followed by
    this call's; what each layer ends with is the graph's `present` output."""

    def __init__(self, past: list[torch.Tensor]):
        self.past = past
        self.present: list[torch.Tensor] = []
        self.length = 0  # unused: positions come from position_ids

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.past:
            k = torch.cat([self.past[2 * layer], k], dim=2)
            v = torch.cat([self.past[2 * layer + 1], v], dim=2)
        self.present += [k, v]
        return k, v


class LanguageModelStep(nn.Module):
    """One forward over new tokens with the KV cache in and out: prefill (no past) or decode."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor] | None = None):
        cache = ConcatCache(past or [])
        new, total = input_ids.shape[1], attention_mask.shape[1]
        query = torch.arange(new, device=input_ids.device) + (total - new)  # each new token's column
        key = torch.arange(total, device=input_ids.device)
        # causal, minus the padding; a pad query sees itself only, so no row is all -inf (as generate's mask)
        allowed = (key[None, :] <= query[:, None])[None] & attention_mask.bool()[:, None, :]
        allowed = allowed | (key[None, :] == query[:, None])[None]
        logits = self.model(input_ids, positions=position_ids, mask=allowed[:, None], cache=cache)
        return (logits, *cache.present)


class Scorer(nn.Module):
    """A reward model's score of each right-padded row, read at its last real token (as training reads it)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        position_scores = self.model(input_ids)[..., 0]
        last = (attention_mask.sum(-1, keepdim=True) - 1).clamp(min=0)
        return position_scores.gather(-1, last).squeeze(-1), position_scores


def export_graphs(model: Transformer, folder: Path) -> dict[str, dict]:
    """Write the model's fp32 graphs into folder; {file: {"inputs": {name: axes}, "outputs": {name: axes}}},
    the axes named as the module docstring names them."""
    config, source = model.config, model
    model = untied(model)
    with WeightsFile(folder / WEIGHTS_FILE) as weights:
        if model.score is not None:
            tokens = torch.tensor([[0, 5, 9, 2], [0, 7, 2, 2]])
            axes = {"inputs": {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]},
                    "outputs": {"scores": ["batch"], "position_scores": ["batch", "seq"]}}
            _export(Scorer(model), (tokens, (tokens != 2).long()), folder / SCORE, axes, weights)
            return {SCORE: axes}
        cache_axes = ["batch", config.n_kv_heads, "seq", config.head_dim]
        prefill_axes = {"inputs": {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"],
                                   "position_ids": ["batch", "seq"]},
                        "outputs": {"logits": ["batch", "seq", config.vocab_size],
                                    **dict.fromkeys(cache_names("present", config.n_layers), cache_axes)}}
        tokens = torch.tensor([[2, 0, 5, 9, 11], [0, 7, 8, 3, 4]])
        mask = (tokens != 2).long()
        _export(LanguageModelStep(model), (tokens, mask, (mask.cumsum(-1) - 1).clamp(min=0)), folder / PREFILL,
                prefill_axes, weights)
        # The decode step's example has two new tokens, not one: an example axis of size 1 would be frozen at 1.
        past = [torch.zeros(2, config.n_kv_heads, 5, config.head_dim) for _ in range(2 * config.n_layers)]
        step_mask = torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], dim=1)
        step_positions = mask.sum(-1, keepdim=True) + torch.arange(2)
        total_axes = ["batch", config.n_kv_heads, "past_seq + seq", config.head_dim]
        decode_axes = {"inputs": {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "past_seq + seq"],
                                  "position_ids": ["batch", "seq"],
                                  **dict.fromkeys(cache_names("past", config.n_layers),
                                                  ["batch", config.n_kv_heads, "past_seq", config.head_dim])},
                       "outputs": {"logits": ["batch", "seq", config.vocab_size],
                                   **dict.fromkeys(cache_names("present", config.n_layers), total_axes)}}
        _export(LanguageModelStep(model), (tokens[:, :2], step_mask, step_positions, past), folder / DECODE,
                decode_axes, weights)
    if model is not source:  # the output matrix copied for the graphs, which the exporter's leftovers still hold
        model.lm_head.weight.data = torch.empty(0)  # (onnxscript's rewrite rules keep the last graph they matched)
    return {PREFILL: prefill_axes, DECODE: decode_axes}


def untied(model: Transformer) -> Transformer:
    """The model with its own output matrix when it shares the embedding's: a shared weight reaches the output
    MatMul through a Transpose run at every step, which the quantizers cannot quantize either. The copy shares
    every other tensor with the model: only the output matrix is new memory."""
    if not (model.config.tie_embeddings and model.lm_head is not None):
        return model
    with torch.device("meta"):
        copy = Transformer(model.config)
    copy.load_state_dict(model.state_dict(), assign=True)  # the model's tensors themselves, not copies
    copy.rope_cos, copy.rope_sin = model.rope_cos, model.rope_sin
    copy.lm_head.weight = nn.Parameter(model.embed_tokens.weight.detach().clone())
    return copy.eval()


def _export(module: nn.Module, example: tuple, path: Path, axes: dict, weights: WeightsFile) -> None:
    """torch.onnx.export with every axis of every input dynamic (the exporter works out which are equal), its
    progress lines and warnings kept off the console, then the graph's inputs and outputs named as `axes`; saved
    with its tensors of INLINE_BYTES or more in `weights` (beside `path`), a tensor at a time."""
    dynamic = tuple([{0: AUTO, 2: AUTO}] * len(x) if isinstance(x, list) else dict.fromkeys(range(x.dim()), AUTO)
                    for x in example)
    with quiet_exporter():
        program = torch.onnx.export(module.eval(), example, dynamo=True, dynamic_shapes=dynamic,
                                    input_names=list(axes["inputs"]),
                                    output_names=list(axes["outputs"]), verbose=False,
                                    opset_version=OPSET)
    graph = program.model.graph
    # The exporter's record of each node's origin (our stack traces, FX nodes): 80% of a graph file's bytes.
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for key in [key for key in node.metadata_props if key.startswith("pkg.torch.onnx.")]:
            del node.metadata_props[key]
    for value in [*graph.inputs, *graph.outputs]:
        names = axes["inputs"].get(value.name) or axes["outputs"][value.name]
        value.shape = ir.Shape([name if isinstance(name, str) else dim
                                for dim, name in zip(value.shape, names, strict=True)])
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.nbytes >= INLINE_BYTES:
            offset, length = weights.add(functools.partial(iter, [tensor.tobytes()]))
            value.const_value = ir.ExternalTensor(WEIGHTS_FILE, offset, length, tensor.dtype, shape=tensor.shape,
                                                  name=value.name, base_dir=path.parent)
    ir.save(program.model, path)


@contextlib.contextmanager
def quiet_exporter():
    """The exporter and onnxruntime's quantizer print a line per phase and log advice, progress and warnings
    about ops they do not need (torchvision's) on their own and the root logger: errors only."""
    loggers = [logging.getLogger(name) for name in ("", "torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
