"""Deployment: a checkpoint as ONNX graphs with a KV cache for onnxruntime, fp32 or quantized (int8, int4)."""
