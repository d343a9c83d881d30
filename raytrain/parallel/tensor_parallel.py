"""Tensor parallelism with DTensor's parallelize_module (Megatron-style column/row split).

Attention q/k/v and MLP gate/up are split by output columns (each rank holds whole heads),
attention output and MLP down by input rows, so each block needs one all-reduce forward
and one backward per sub-layer. The embedding is split by vocabulary rows and the output
head by vocabulary columns (its logits gathered for the loss).
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from raytrain.model.config import TransformerConfig
from raytrain.model.transformer import Transformer

BLOCK_PLAN = {
    "self_attn.q_proj": ColwiseParallel(),
    "self_attn.k_proj": ColwiseParallel(),
    "self_attn.v_proj": ColwiseParallel(),
    "self_attn.o_proj": RowwiseParallel(),
    "mlp.gate_proj": ColwiseParallel(),
    "mlp.up_proj": ColwiseParallel(),
    "mlp.down_proj": RowwiseParallel(),
}


def tp_errors(config: TransformerConfig, tp: int) -> list[str]:
    """Why the model cannot be split over tp ranks (empty when it can)."""
    errors = []
    for key in ("n_heads", "n_kv_heads"):
        if getattr(config, key) % tp:
            errors.append(f"model.{key}={getattr(config, key)} is not divisible by parallel.tp={tp}; "
                          "choose a tp that divides it")
    if config.hidden_dim % tp:
        errors.append(f"the MLP width {config.hidden_dim} is not divisible by parallel.tp={tp}")
    if tp > 1 and config.tie_embeddings:
        errors.append("model.tie_embeddings is not supported with parallel.tp > 1 yet; set it false")
    if config.vocab_size % tp:
        errors.append(f"model.vocab_size={config.vocab_size} is not divisible by parallel.tp={tp}")
    return errors


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Split the model, or the pipeline stage, in place (a stage may lack embedding or head)."""
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, BLOCK_PLAN)
    root_plan = {}
    if model.embed_tokens is not None:
        root_plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate())
    if model.lm_head is not None:
        root_plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    if root_plan:
        parallelize_module(model, tp_mesh, root_plan)
