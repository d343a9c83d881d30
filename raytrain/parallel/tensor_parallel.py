"""Tensor parallelism with DTensor's parallelize_module (Megatron-style column/row split).

Attention q/k/v and MLP gate/up are split by output columns (each rank holds whole heads),
attention output and MLP down by input rows, so each block needs one all-reduce forward
and one backward per sub-layer. The embedding is split by vocabulary rows and the output
head by vocabulary columns; a tied head shares the embedding's shards (both are Shard(0)).

Sequence parallel (Megatron-SP): between the sub-layers the residual stream and the norms
hold only this rank's slice of the sequence; each all-reduce becomes an all-gather before
the sub-layer and a reduce-scatter after it (the same traffic), and the norms' activations
shrink by tp. Loss parallel: the head's logits stay split over the vocabulary and the
cross-entropy runs on the shards (under `loss_parallel()`), so no rank holds full logits.
A reward model's score head (one output) is replicated: every tp rank computes the same scores.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from raytrain.model.config import TransformerConfig
from raytrain.model.transformer import Transformer


def _distribute(name: str, module: nn.Module, placements: dict[str, Placement], mesh: DeviceMesh,
                src_data_rank) -> None:
    """A linear layer's parameters as DTensors, each placed as named (dotted names reach a LoRA adapter's).
    distribute_module calls this for the layer (name "") and then for each of its submodules (a LoRA layer's
    adapters), whose parameters the layer's call placed already."""
    if name:
        return
    for name, placement in placements.items():
        owner_name, _, key = name.rpartition(".")
        owner = getattr(module, owner_name, None) if owner_name else module  # no adapter on a plain layer
        param = getattr(owner, key, None)
        if param is not None:
            owner.register_parameter(key, nn.Parameter(
                distribute_tensor(param, mesh, [placement], src_data_rank=src_data_rank),
                requires_grad=param.requires_grad))


class Colwise(ColwiseParallel):
    """ColwiseParallel that also splits a LoRA layer (model/lora.py): lora_A (in → rank) whole on every rank,
    lora_B (rank → out) by output rows like the base weight, so the update is split as the base output is."""

    def _partition_linear_fn(self, name, module, device_mesh):
        _distribute(name, module, {"weight": Shard(0), "bias": Shard(0), "lora_A.weight": Replicate(),
                             "lora_B.weight": Shard(0)}, device_mesh, self.src_data_rank)


class Rowwise(RowwiseParallel):
    """RowwiseParallel that also splits a LoRA layer: lora_A by input columns like the base weight (each rank's
    partial sum), lora_B whole; the update's partial sums are reduced with the base output's."""

    def _partition_linear_fn(self, name, module, device_mesh):
        _distribute(name, module, {"weight": Shard(1), "bias": Replicate(), "lora_A.weight": Shard(1),
                             "lora_B.weight": Replicate()}, device_mesh, self.src_data_rank)


PROJECTIONS = {
    "self_attn.q_proj": Colwise(),
    "self_attn.k_proj": Colwise(),
    "self_attn.v_proj": Colwise(),
    "mlp.gate_proj": Colwise(),
    "mlp.up_proj": Colwise(),
}
ATTENTION_ARGS = 6  # Attention.forward(x, cos, sin, causal, mask, cache): only x is laid out


def block_plan(sequence_parallel: bool, qk_norm: bool = False) -> dict:
    # Qwen3's per-head norms run on this rank's heads (dim 2 of [batch, length, heads, head_dim]); their shared
    # weight's gradient is summed over the ranks' heads by DTensor.
    head_norms = {"self_attn.q_norm": Replicated(Shard(2), gather=False),
                  "self_attn.k_norm": Replicated(Shard(2), gather=False)} if qk_norm else {}
    if not sequence_parallel:
        # Norms replicated as DTensors, so every parameter is one: an optimizer's foreach step fails on a
        # group that mixes DTensors and plain tensors (a reward model's replicated head joins the split matrices).
        return {**PROJECTIONS, **head_norms, "self_attn.o_proj": Rowwise(), "mlp.down_proj": Rowwise(),
                "input_layernorm": Replicated(Replicate()), "post_attention_layernorm": Replicated(Replicate())}
    rest = (None,) * (ATTENTION_ARGS - 1)
    return {
        **PROJECTIONS,
        **head_norms,
        "input_layernorm": SequenceParallel(),
        "self_attn": PrepareModuleInput(input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest)),
        "self_attn.o_proj": Rowwise(output_layouts=Shard(1)),
        "post_attention_layernorm": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.down_proj": Rowwise(output_layouts=Shard(1)),
    }


def tp_errors(config: TransformerConfig, tp: int, seq_len: int, sequence_parallel: bool) -> list[str]:
    """Why the model cannot be split over tp ranks (empty when it can)."""
    errors = []
    for key in ("n_heads", "n_kv_heads"):
        if getattr(config, key) % tp:
            errors.append(f"model.{key}={getattr(config, key)} is not divisible by parallel.tp={tp}; "
                          "choose a tp that divides it")
    if config.hidden_dim % tp:
        errors.append(f"the MLP width {config.hidden_dim} is not divisible by parallel.tp={tp}")
    if config.vocab_size % tp:
        errors.append(f"model.vocab_size={config.vocab_size} is not divisible by parallel.tp={tp}")
    if sequence_parallel and seq_len % tp:
        errors.append(f"the data's sequence length {seq_len} is not divisible by parallel.tp={tp}, which "
                      "parallel.sequence_parallel needs; set it false or prepare rows of a multiple of tp")
    return errors


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool,
                          split_loss: bool) -> None:
    """Split the model, or the pipeline stage, in place (a stage may lack embedding or head)."""
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}  # LoRA's base
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan(sequence_parallel, model.config.qk_norm))
    stream = Shard(1) if sequence_parallel else Replicate()  # the residual stream between blocks
    root_plan = {}
    if model.embed_tokens is not None:
        root_plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
    if model.lm_head is not None or model.score is not None:
        root_plan["norm"] = SequenceParallel() if sequence_parallel else Replicated(Replicate())
    if model.lm_head is not None:
        root_plan["lm_head"] = ColwiseParallel(input_layouts=stream,
                                               output_layouts=Shard(-1) if split_loss else Replicate(),
                                               use_local_output=not split_loss)
    if model.score is not None:
        # Scores are read at each response's last token, wherever it lies: the head sees the whole sequence.
        root_plan["score"] = Replicated(stream)
    if root_plan:
        parallelize_module(model, tp_mesh, root_plan)
    if model.config.tie_embeddings and model.embed_tokens is not None and model.lm_head is not None:
        # parallelize_module gave each module its own DTensor: tie them again.
        model.lm_head.weight = model.embed_tokens.weight
    for name, param in model.named_parameters():  # SequenceParallel's new parameters all require gradients
        if name in frozen:
            param.requires_grad_(False)


class Replicated(ParallelStyle):
    """A module too small to split (the final norm and score head of a reward model): its weights replicated
    DTensors (so the optimizer sees DTensors only), its input gathered from `input_layout`, its output a plain
    tensor that every tp rank holds whole. gather=False: the input stays split as `input_layout` says, and so
    does the output (each rank's part)."""

    def __init__(self, input_layout: Placement, gather: bool = True):
        super().__init__()
        self.input_layout, self.gather = input_layout, gather

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate(name, part, mesh):
            for key, param in list(part.named_parameters(recurse=False)):
                part.register_parameter(key, nn.Parameter(distribute_tensor(param, mesh, [Replicate()]),
                                                          requires_grad=param.requires_grad))

        def gather(part, inputs, mesh):
            x = inputs[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, [self.input_layout], run_check=False)
            return (x.redistribute(mesh, [Replicate()]) if self.gather else x, *inputs[1:])

        return distribute_module(module, device_mesh, replicate, input_fn=gather,
                                 output_fn=lambda part, output, mesh: output.to_local())


def loss_context(enabled: bool):
    """The context the cross-entropy's forward and backward must run in under loss parallel."""
    return loss_parallel() if enabled else contextlib.nullcontext()
