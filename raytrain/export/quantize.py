"""Quantizing an exported fp32 graph with onnxruntime's own tools.

int8: dynamic quantization (`quantize_dynamic`): signed int8 weights, one scale per output channel (one for the
whole output head: onnxruntime 1.32's per-channel head moved the test model's mean |Δ log-probability| from 0.05 to
0.32), activations quantized on the fly. Only MatMul (the linear layers; the attention's activation-by-activation
products stay float) and Gather (the embedding): with opset ≥ 23 the Attention op would otherwise become an invalid
QAttention.
int4: 4-bit weights in symmetric blocks of 32 (`MatMulNBitsQuantizer`), the linear layers (MatMulNBits, computing
in int8: accuracy level 4) and the embedding (GatherBlockQuantized).

A graph of any size: the quantizers read the fp32 graph with its external weights and write the quantized one
with external data too (one fp32 copy of one graph in memory at a time); `quantize_folder` then gives the
quantized graphs one shared weights file, as the fp32 folder has.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from raytrain.export.folder import share_weights
from raytrain.export.graphs import quiet_exporter

QUANTIZATIONS = ("none", "int8", "int4")
INT4_BLOCK = 32


def output_head(graph: Path) -> list[str]:
    """The MatMul that computes a language model's logits (its name in a list), or none (a reward model's)."""
    nodes = onnx.load(graph, load_external_data=False).graph.node
    return [node.name for node in nodes if node.op_type == "MatMul" and "logits" in node.output]


def quantize_folder(source: Path, target: Path, graphs: dict | list, method: str) -> None:
    """The graphs of the export folder `source` quantized with `method` into the folder `target`, their weights
    in one shared file."""
    for name in graphs:
        quantize(source / name, target / name, method)
    share_weights(target, graphs)


def quantize(source: Path, target: Path, method: str) -> None:
    """Write source (an fp32 graph) quantized with `method` (int8, int4) to target, its weights in
    `target`.data."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with quiet_exporter():
        if method == "int8":
            head = output_head(source)
            quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gather"], nodes_to_exclude=head,
                             use_external_data_format=True)
            if head:  # one scale for the output head: per-channel, onnxruntime 1.32 drifts it 6× more (measured)
                first = target.with_name(f".{target.name}.per-channel")
                target.replace(first)  # its weights stay in target.data; the second pass appends its own there
                quantize_dynamic(first, target, weight_type=QuantType.QInt8, per_channel=False,
                                 op_types_to_quantize=["MatMul"], nodes_to_quantize=head,
                                 use_external_data_format=True)
                first.unlink()
        elif method == "int4":
            quantizer = MatMulNBitsQuantizer(onnx.load(source), block_size=INT4_BLOCK, is_symmetric=True,
                                             accuracy_level=4, op_types_to_quantize=("MatMul", "Gather"),
                                             quant_axes=(("MatMul", 0), ("Gather", 1)))
            quantizer.process()
            quantizer.model.save_model_to_file(str(target), use_external_data_format=True)
        else:
            raise ValueError(f"unknown quantization {method!r}")

