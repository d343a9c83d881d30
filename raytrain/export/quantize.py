"""Quantizing an exported fp32 graph with onnxruntime's own tools.

int8: dynamic quantization (`quantize_dynamic`): signed int8 weights, one scale per output channel, activations
quantized on the fly. Only MatMul (the linear layers; the attention's activation-by-activation products stay
float) and Gather (the embedding): with opset ≥ 23 the Attention op would otherwise become an invalid QAttention.
int4: 4-bit weights in symmetric blocks of 32 (`MatMulNBitsQuantizer`), the linear layers (MatMulNBits, computing
in int8: accuracy level 4) and the embedding (GatherBlockQuantized).
"""

from __future__ import annotations

from pathlib import Path

import onnx

from raytrain.export.graphs import quiet_exporter

QUANTIZATIONS = ("none", "int8", "int4")
INT4_BLOCK = 32


def quantize(source: Path, target: Path, method: str) -> None:
    """Write source (an fp32 graph) quantized with `method` (int8, int4) to target."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with quiet_exporter():
        if method == "int8":
            quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gather"])
        elif method == "int4":
            quantizer = MatMulNBitsQuantizer(onnx.load(source), block_size=INT4_BLOCK, is_symmetric=True,
                                             accuracy_level=4, op_types_to_quantize=("MatMul", "Gather"),
                                             quant_axes=(("MatMul", 0), ("Gather", 1)))
            quantizer.process()
            quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
        else:
            raise ValueError(f"unknown quantization {method!r}")

