"""LoRA weight sync: a LoRA policy's rollout actors given merged weights vs its adapters only (`ppo.lora_sync`).

Policies of the demo model's shape (4 layers, vocab 4096) at a few widths, rank-16 adapters on every projection,
fp32, randomly initialised; 2 rollout actors × 1 thread (the native engine), streamed over gloo in the default
buckets by the learner's own WeightSender (one learner rank). A sync is timed from the first gather to every actor
holding the version. merged: each adapted layer's weight gathered, merged (W + B·A·α/r) and sent whole; adapters:
the adapters only, each actor merging them into the base weights it kept from the one whole sync that starts every
side (untimed, as for merged). Interleaved over the repeats.
"""

from __future__ import annotations

from bench.common import TINY, curve, pick, ratio_cell
from bench.ppo import MIB, SYNC_REPEATS, timed_syncs
from raytrain.config import LoRAConfig, load_config

RAY_CPUS = 6  # two sides × two actors × one CPU, and room beside them
SIZES = pick([192, 768, 1536], [48, 96])
ACTORS = 2
LORA = LoRAConfig(rank=16, alpha=32.0)


def lora_policy(d_model: int):
    """(the demo model at this width with adapters whose update is not zero, its config)."""
    import torch

    from raytrain.model.lora import apply_lora, init_lora, lora_parameters
    from raytrain.model.transformer import Transformer

    config = load_config("demo", [f"model.d_model={d_model}"]).model
    policy = Transformer(config)
    policy.init_weights(0)
    apply_lora(policy, LORA)
    init_lora(policy, seed=0)
    with torch.no_grad():  # a trained-looking update: lora_B starts at zero
        for name, parameter in lora_parameters(policy).items():
            if ".lora_B." in name:
                parameter.normal_(0, 0.01)
    return policy, config


def sent_mib(policy) -> tuple[float, float, float]:
    """(MiB a merged sync sends, MiB an adapters-only sync sends, MiB of base weights each actor keeps)."""
    from raytrain.model.lora import is_adapter
    from raytrain.rlhf.weight_sync import adapted_layers, synced_parameters

    merged = sum(p.numel() * 4 for _, p, _ in synced_parameters(policy))
    adapters = {name: p for name, p, _ in synced_parameters(policy, adapters=True) if is_adapter(name)}
    weights = dict(policy.named_parameters())
    kept = sum(weights[f"{layer}.weight"].numel() * 4 for layer in adapted_layers(adapters))
    return merged / MIB, sum(p.numel() * 4 for p in adapters.values()) / MIB, kept / MIB


def run() -> str:
    results = {}
    for size in SIZES:
        policy, config = lora_policy(size)
        results[size] = (timed_syncs(policy, config, {"merged": {}, "adapters": {"adapters": True}}, ACTORS, 1),
                         sent_mib(policy))
    rows = []
    for size, (spreads, (merged_mib, adapter_mib, kept_mib)) in results.items():
        merged, adapters = (spreads[side]["s"] for side in ("merged", "adapters"))
        rows.append(f"| d_model {size} | {1000 * merged.median:,.1f} ({1000 * min(merged.values):,.1f}–"
                    f"{1000 * max(merged.values):,.1f}) | {1000 * adapters.median:,.1f} "
                    f"({1000 * min(adapters.values):,.1f}–{1000 * max(adapters.values):,.1f}) | "
                    f"{ratio_cell(adapters, merged, lower_is_better=True)} | {merged_mib:,.1f} vs {adapter_mib:,.2f} | "
                    f"{kept_mib:,.1f} |")
    figure = curve("lora-weight-sync", "LoRA policy weight sync vs model size", "d_model", SIZES,
                   {side: [results[size][0][side]["s"].median * 1000 for size in SIZES]
                    for side in ("merged", "adapters")}, "sync, ms", fmt="{:,.1f}")
    return "\n".join([
        "## LoRA weight sync: merged weights vs adapters only (CPU)",
        "",
        f"A LoRA policy (rank {LORA.rank} on every projection) of the demo model's shape at each width, fp32, into "
        f"{ACTORS} rollout actors × 1 thread (native engine), streamed over gloo in buckets of "
        f"{int(load_config('demo').ppo.sync_bucket_mb)} MiB by the learner's WeightSender. A sync: from the first "
        "gather to every actor holding the version. merged (`ppo.lora_sync=merged`, the default): each adapted "
        "layer merged on the learner and sent whole; adapters (`ppo.lora_sync=adapters`): the adapters only, each "
        "actor merging them into the base it kept from the first, whole sync (untimed on both sides). "
        f"{SYNC_REPEATS} syncs per side and size, interleaved: each figure is their median (min–max); a ratio whose "
        "two ranges overlap is marked *inside the noise*.",
        "",
        "| policy | merged, ms | adapters only, ms | speed-up | MiB sent per sync (merged vs adapters) | base MiB "
        "each actor keeps (adapters only) |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        figure,
        "",
        "What it shows: adapters-only sends a few MiB instead of the policy, but each actor then merges every "
        "adapted layer (a rank-16 matrix product per layer) and keeps a copy of the base weights it merges into; "
        "the learner skips its merges and the gathers of the base. With one learner rank and actors on the same "
        "machine the transfer is a memory copy, so this measures the work around it; across machines the bytes "
        "sent dominate and favour adapters only further.",
        *(["", "(A `--tiny` smoke run: a toy model and a few syncs; the figures mean nothing.)"] if TINY else []),
    ])
