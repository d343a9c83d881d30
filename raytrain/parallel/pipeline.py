"""Pipeline parallelism with torch.distributed.pipelining.

The model's layers are cut into stages (evenly, or by an explicit list of layers per stage);
with V virtual stages per rank there are pp × V stages and rank r holds stages r, r + pp, …
(the loop order Interleaved1F1B expects). Each stage is the model built on the meta device with the
layers of other stages deleted (the first keeps the embedding, the last the final norm and head), then given
the values its layers have in the whole model, so weights do not depend on the split. Parameter names stay
those of the full model, so checkpoints reshard across layouts.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from raytrain.model.config import TransformerConfig
from raytrain.model.transformer import Transformer

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


def stage_layers(n_layers: int, n_stages: int, explicit: list[int]) -> list[range]:
    """Layer ranges of each stage: the explicit counts, or as even as possible (extra layers go last)."""
    counts = explicit or [n_layers // n_stages + (1 if i >= n_stages - n_layers % n_stages else 0)
                          for i in range(n_stages)]
    starts = [sum(counts[:i]) for i in range(n_stages)]
    return [range(start, start + count) for start, count in zip(starts, counts, strict=True)]


def pipeline_errors(config: TransformerConfig, pp: int, virtual: int, explicit: list[int]) -> list[str]:
    stages = pp * virtual
    if explicit and len(explicit) != stages:
        return [f"parallel.pp_layers lists {len(explicit)} stages but pp × pp_virtual_stages = {stages}"]
    if explicit and (sum(explicit) != config.n_layers or min(explicit) < 0):
        return [f"parallel.pp_layers {explicit} must be counts >= 0 summing to model.n_layers={config.n_layers}"]
    if pp > 1 and config.tie_embeddings:
        return ["model.tie_embeddings needs the embedding and the output head on one rank, but parallel.pp > 1 "
                "puts them on the first and the last stage; set model.tie_embeddings=false"]
    if not explicit and config.n_layers < stages:
        return [f"model.n_layers={config.n_layers} is fewer than pp × pp_virtual_stages = {stages} stages; "
                "lower parallel.pp or parallel.pp_virtual_stages"]
    return []


class CallWithCausal(nn.Module):
    """Passes the objective's attention mode to a stage (a schedule passes tensors only)."""

    def __init__(self, part: Transformer, causal: bool):
        super().__init__()
        self.part = part
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.part(x, causal=self.causal)


def parts_on_meta(config: TransformerConfig, parallel, pp_rank: int, head: str = "lm") -> list[tuple[int, Transformer]]:
    """(stage index, model part) for what a rank of pipeline rank pp_rank holds, built on the meta device: the
    whole model, or its pipeline stages."""
    with torch.device("meta"):
        if parallel.pp > 1:
            return build_stage_parts(config, parallel.pp, pp_rank, parallel.pp_virtual_stages, parallel.pp_layers)
        return [(0, Transformer(config, head=head))]


def build_stage_parts(config: TransformerConfig, pp: int, pp_rank: int, virtual: int,
                      explicit: list[int]) -> list[tuple[int, Transformer]]:
    """(stage index, model part) for the stages this rank holds, weights unset: callers build on the meta
    device, then materialize gives each part the values its layers have in the whole model."""
    n_stages = pp * virtual
    ranges = stage_layers(config.n_layers, n_stages, explicit)
    parts = []
    for stage in range(pp_rank, n_stages, pp):
        part = Transformer(config)
        for name in list(part.layers):
            if int(name) not in ranges[stage]:
                del part.layers[name]
        if stage != 0:
            part.embed_tokens = None
        if stage != n_stages - 1:
            part.norm = None
            part.lm_head = None
        parts.append((stage, part))
    return parts


def build_schedule(name: str, stages: list[tuple[int, nn.Module]], n_stages: int, device: torch.device,
                   group, microbatches: int, loss_fn):
    pipeline_stages = [PipelineStage(module, index, n_stages, device, group=group) for index, module in stages]
    schedule_class = SCHEDULES[name]
    # The loss is already a share of the global token sum: gradients must not be divided again.
    if name == "interleaved_1f1b":
        return schedule_class(pipeline_stages, microbatches, loss_fn=loss_fn, scale_grads=False)
    (only,) = pipeline_stages
    return schedule_class(only, microbatches, loss_fn=loss_fn, scale_grads=False)
