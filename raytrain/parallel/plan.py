"""`raytrain plan`: a dry run of a parallel layout for N ranks, without GPUs or real memory.

For each pipeline stage the model part is built on the meta device and the real plan
(pipeline split, TP, activation checkpointing, FSDP2) is applied over a fake process group,
so the parameter shapes and placements are exactly those a run would have. Every rank's
local parameter count then follows from DTensor's own sharding arithmetic.

Memory per rank: fp32 master weights, fp32 gradients and two fp32 AdamW states per local
parameter; with FSDP, two blocks gathered at a time in the compute dtype (under pipelining
all the rank's blocks: they stay gathered for the step's micro-batches). Activations are
what autograd keeps per token and layer in this model, with a = 2 bytes under bf16, 4 under
fp32 and the residual stream and norm statistics in fp32 (checked against a tracked run):
each norm keeps its input, its normalised value and its output as the next matmul's input,
(4 + 4 + a)·d; attention keeps q and k after rotary, v, its output and the output
projection's input, a·(3·d + 2·kv)/tp; the SwiGLU MLP keeps four ffn-wide tensors, 4·a·ffn/tp.
Sequence parallel splits the norms' input and normalised value by tp (the gathered matmul
input stays whole). A checkpointed layer keeps only its input (4·d), plus one layer being
recomputed. The last stage adds the final norm and 12 bytes × vocab per token for the
cross-entropy (fp32 log-probabilities and two gradients of that size), split by tp under
loss parallel. Pipeline schedules keep several micro-batches in flight: all under GPipe,
pp − stage under 1F1B (more under interleaving). Building and loading the model (parallel/materialize.py,
train/hf_checkpoint.py) holds beside the rank's shards one block of seeded values or the rank's slice of one
stored tensor. Left out: the CUDA context, allocator
fragmentation and communication buffers, so a rank "fits" below 90% of device memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from raytrain.config import Config
from raytrain.model.flops import train_flops_per_token
from raytrain.model.transformer import INIT_BLOCK_VALUES, Transformer
from raytrain.parallel.layout import MESH_DIMS, build_layout, parallelize, plain_ddp
from raytrain.parallel.pipeline import parts_on_meta, stage_layers

GIB = 2**30
HEADROOM = 0.9


@dataclass(frozen=True)
class ParamLayout:
    shape: tuple[int, ...]
    placements: tuple
    mesh_dims: tuple[str, ...]  # () for a plain tensor: whole on every rank
    mesh_shape: tuple[int, ...]


@dataclass
class RankPlan:
    rank: int
    pp_rank: int
    stages: list[int]
    layers: int
    params: int
    owned_params: int  # those counted once per replica: replicated copies only on the first such rank
    param_gib: float
    grad_gib: float
    optimizer_gib: float
    fsdp_buffer_gib: float
    activation_gib: float
    build_host_gib: float  # host memory beside its shards while building and loading: one init block or slice

    @property
    def total_gib(self) -> float:
        return self.param_gib + self.grad_gib + self.optimizer_gib + self.fsdp_buffer_gib + self.activation_gib


def _stage_params(config: Config, world: int, pp_rank: int) -> tuple[list[int], list[ParamLayout]]:
    """Build this pipeline rank's parts on meta over a fake process group; return their parameter layouts."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    parallel = config.parallel
    rank = pp_rank * (world // parallel.pp)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        layout = build_layout(parallel, world, torch.device("cpu"))
        stages = parts_on_meta(config.model, parallel, pp_rank)
        params = []
        for _, part in stages:
            if not plain_ddp(parallel):  # DDP leaves the parameters as they are (and cannot wrap meta ones)
                parallelize(part, parallel, layout, torch.device("cpu"), bf16=True)
            for p in part.parameters():
                if isinstance(p, DTensor):
                    mesh = p.device_mesh
                    params.append(ParamLayout(tuple(p.shape), tuple(p.placements), tuple(mesh.mesh_dim_names),
                                              tuple(mesh.shape)))
                else:
                    params.append(ParamLayout(tuple(p.shape), (), (), ()))
        return [index for index, _ in stages], params
    finally:
        dist.destroy_process_group()


def _owned(param: ParamLayout, coordinate: dict[str, int]) -> bool:
    """Within a replica, a parameter not split over dp_shard or tp counts on coordinate 0 of that dim."""
    split = {dim for dim, placement in zip(param.mesh_dims, param.placements, strict=True)
             if not placement.is_replicate()}  # Shard, or FSDP-over-TP's _StridedShard
    return all(coordinate[dim] == 0 for dim in ("dp_shard", "tp") if dim not in split)


def _local_numel(param: ParamLayout, coordinate: dict[str, int]) -> int:
    if not param.mesh_dims:
        return math.prod(param.shape)
    # A private helper whose signature has changed across torch releases: imported only for sharded
    # parameters, so that planning one unsharded rank (bench/gpu_check.py's) works on any torch.
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    mine = [coordinate[name] for name in param.mesh_dims]
    shape, _ = _compute_local_shape_and_global_offset(param.shape, param.mesh_shape, mine, param.placements)
    return math.prod(shape)


def _in_flight(config: Config, pp_rank: int) -> int:
    """Micro-batches whose activations a pipeline rank holds at once."""
    parallel, micro = config.parallel, config.train.micro_batches
    if parallel.pp == 1:
        return 1
    if parallel.pp_schedule == "gpipe":
        return micro
    if parallel.pp_schedule == "1f1b":
        return min(micro, parallel.pp - pp_rank)
    virtual = parallel.pp_virtual_stages
    return min(micro * virtual, parallel.pp - pp_rank + (virtual - 1) * parallel.pp)


def compute_bytes(config: Config) -> int:
    """Bytes per element of activations and of FSDP's gathered parameters."""
    return 2 if config.train.precision == "bf16" else 4


def activation_bytes_per_token(config: Config, layers: int, last_stage: bool) -> float:
    model, parallel = config.model, config.parallel
    d, kv, ffn, tp = model.d_model, model.n_kv_heads * model.head_dim, model.hidden_dim, parallel.tp
    a = compute_bytes(config)
    split_sequence = tp > 1 and parallel.sequence_parallel
    norm = 8 * d / tp + a * d if split_sequence else (8 + a) * d
    layer = 2 * norm + a * (3 * d + 2 * kv + 4 * ffn) / tp
    if parallel.activation_checkpointing == "full":
        checkpointed = math.ceil(layers / parallel.ac_every)
        stored = checkpointed * 4 * d / (tp if split_sequence else 1) + (layers - checkpointed + 1) * layer
    else:
        stored = layers * layer
    if last_stage:
        split_loss = tp if tp > 1 and parallel.loss_parallel else 1
        stored += norm + 12 * model.vocab_size / split_loss
    return stored


def plan_ranks(config: Config, world: int, seq_len: int) -> list[RankPlan]:
    parallel = config.parallel
    micro_tokens = config.train.global_batch // parallel.dp // config.train.micro_batches * seq_len
    n_stages = parallel.pp * parallel.pp_virtual_stages
    layer_ranges = stage_layers(config.model.n_layers, n_stages, parallel.pp_layers)
    block_params = sum(p.numel() for p in Transformer.block_parameter_shapes(config.model))
    fsdp = parallel.dp > 1 and not plain_ddp(parallel)
    plans = []
    for pp_rank in range(parallel.pp):
        stages, params = _stage_params(config, world, pp_rank)
        layers = sum(len(layer_ranges[s]) for s in stages)
        last = n_stages - 1 in stages
        activations = _in_flight(config, pp_rank) * micro_tokens * activation_bytes_per_token(config, layers, last)
        gathered_blocks = (layers if parallel.pp > 1 else 2) if fsdp else 0
        gather = gathered_blocks * compute_bytes(config) * block_params / parallel.tp
        per_stage = world // parallel.pp
        for offset in range(per_stage):
            rank = pp_rank * per_stage + offset
            coordinate = dict(zip(MESH_DIMS, _unravel(rank, (parallel.pp, parallel.dp_replicate, parallel.shard,
                                                            parallel.tp)), strict=True))
            local = sum(_local_numel(p, coordinate) for p in params)
            owned = sum(_local_numel(p, coordinate) for p in params if _owned(p, coordinate))
            largest = max(_local_numel(p, coordinate) for p in params)
            plans.append(RankPlan(rank, pp_rank, stages, layers, local, owned, 4 * local / GIB, 4 * local / GIB,
                                  8 * local / GIB, gather / GIB, activations / GIB,
                                  4 * max(INIT_BLOCK_VALUES, largest) / GIB))
    return plans


def _unravel(rank: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    coordinate = []
    for size in reversed(shape):
        coordinate.append(rank % size)
        rank //= size
    return tuple(reversed(coordinate))


def step_estimate(config: Config, world: int, seq_len: int, peak_tflops: float, mfu: float) -> dict[str, float]:
    parallel = config.parallel
    tokens = config.train.global_batch * seq_len
    flops = train_flops_per_token(config.model, seq_len) * tokens
    if parallel.activation_checkpointing == "full":
        flops *= 1 + (1 / 3) / parallel.ac_every  # the recomputed forward of checkpointed layers
    ideal = flops / (world * peak_tflops * 1e12 * mfu)
    micro = config.train.micro_batches * parallel.pp_virtual_stages
    bubble = (parallel.pp - 1) / (micro + parallel.pp - 1) if parallel.pp > 1 else 0.0
    seconds = ideal / (1 - bubble)
    return {"step_s": seconds, "tokens_per_s": tokens / seconds, "bubble": bubble, "flops_per_step": flops}


def layout_fits(plans: list[RankPlan], gpu_memory_gib: float) -> bool:
    """Every rank's estimate fits its device with the headroom left."""
    return max(p.total_gib for p in plans) <= HEADROOM * gpu_memory_gib


def format_plan(config: Config, world: int, seq_len: int, plans: list[RankPlan], gpu_memory_gib: float,
                peak_tflops: float, mfu: float) -> str:
    model, parallel = config.model, config.parallel
    with torch.device("meta"):
        total = Transformer(model).num_params()
    replica = [p for p in plans if _unravel(p.rank, (parallel.pp, parallel.dp_replicate, parallel.shard,
                                                     parallel.tp))[1] == 0]
    tp_options = [name for name, on in (("sequence", parallel.sequence_parallel), ("loss", parallel.loss_parallel))
                  if on and parallel.tp > 1]
    tp_mode = f"{' and '.join(tp_options)} parallel; " if tp_options else ""
    ac = parallel.activation_checkpointing
    if ac == "full" and parallel.ac_every > 1:
        ac = f"every {parallel.ac_every} blocks"
    lines = [
        f"model: {total / 1e9:.2f} B parameters (d_model {model.d_model}, {model.n_layers} layers, "
        f"{model.n_heads}/{model.n_kv_heads} heads, ffn {model.hidden_dim}, vocab {model.vocab_size})",
        f"layout: {world} ranks = pp {parallel.pp} × dp_replicate {parallel.dp_replicate} × dp_shard "
        f"{parallel.shard} × tp {parallel.tp}; schedule {parallel.pp_schedule if parallel.pp > 1 else '-'}; "
        f"AC {ac}; {tp_mode}global batch {config.train.global_batch} × {seq_len} "
        f"tokens in {config.train.micro_batches} micro-batch(es)",
        "",
        f"{'ranks':>11} {'stages':>8} {'layers':>6} {'params':>13} {'params':>8} {'grads':>8} {'adam':>8} "
        f"{'fsdp buf':>8} {'activ.':>8} {'total':>8}  fits {gpu_memory_gib:g} GiB?",
    ]
    unit, scale = ("G", 1) if max(p.total_gib for p in plans) >= 1 else ("M", 1024)  # small models in MiB
    groups: dict[tuple, list[int]] = {}
    for p in plans:
        key = (tuple(p.stages), p.layers, p.params, round(p.total_gib, 3))
        groups.setdefault(key, []).append(p.rank)
    by_rank = {p.rank: p for p in plans}
    for ranks in groups.values():
        p = by_rank[ranks[0]]
        span = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}" if ranks[-1] - ranks[0] + 1 == len(
            ranks) else f"{len(ranks)} ranks"
        fits = "yes" if p.total_gib <= HEADROOM * gpu_memory_gib else "NO"
        lines.append(
            f"{span:>11} {','.join(map(str, p.stages)):>8} {p.layers:>6} {p.params:>13,} "
            + " ".join(f"{value * scale:>7.2f}{unit}" for value in (p.param_gib, p.grad_gib, p.optimizer_gib,
                                                                   p.fsdp_buffer_gib, p.activation_gib, p.total_gib))
            + f"  {fits}")
    estimate = step_estimate(config, world, seq_len, peak_tflops, mfu)
    lines += [
        "",
        f"parameters over the ranks of one replica, replicated ones once: {sum(p.owned_params for p in replica):,} "
        f"(model: {total:,})",
        f"building and loading: each rank allocates only its shards (the params column) and at most "
        f"{max(p.build_host_gib for p in plans) * 1024:,.0f} MiB more on the host",
        f"  (a block of seeded values, or its slice of one tensor read from safetensors), never the whole model "
        f"({4 * total / GIB:.1f} GiB in fp32)",
        f"largest rank: {max(p.total_gib for p in plans):.1f} GiB of {gpu_memory_gib:g} GiB "
        f"({'fits' if layout_fits(plans, gpu_memory_gib) else 'does NOT fit'} "
        f"with {1 - HEADROOM:.0%} headroom)",
        f"step: {estimate['flops_per_step'] / 1e15:.1f} PFLOP → {estimate['step_s']:.2f} s at {mfu:.0%} MFU of "
        f"{peak_tflops:g} TFLOP/s per rank (pipeline bubble {estimate['bubble']:.0%}); "
        f"{estimate['tokens_per_s']:,.0f} tokens/s",
    ]
    return "\n".join(lines)
