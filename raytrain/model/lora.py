"""LoRA (Hu et al., 2021): a trainable low-rank update beside frozen linear layers, named as `peft` names it, so an
adapter becomes a PEFT folder by a prefix and `peft.PeftModel.from_pretrained` loads it.

Each targeted `nn.Linear` (by the last part of its name: q_proj, …, down_proj) becomes a LoRALinear in place: the
same parameters, plus two children `lora_A` (in → rank) and `lora_B` (rank → out), computing
base(x) + lora_B(lora_A(dropout(x))) · alpha / rank. lora_B starts at zero (peft's default), so the adapted model
starts as the base model; every other parameter is frozen.
"""

from __future__ import annotations

import contextlib
import json
import math
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.nn import functional as F

from raytrain.config import LORA_TARGETS as TARGETS
from raytrain.config import LoRAConfig
from raytrain.errors import ConfigError
from raytrain.model.hf import hf_name
from raytrain.model.qlora import int8_linear, quantize_layers

PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the base model's own names
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class LoRALinear(nn.Linear):
    """A frozen nn.Linear with a low-rank update (made by add_lora from a plain one, its class swapped)."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    scaling: float
    enabled = True  # off: the base layer alone (adapters_off)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.int8:  # QLoRA's base (model/qlora.py)
            base = int8_linear(x, self.weight, self.weight_scale, self.bias)
        else:
            base = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return base
        return base + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """add_lora with train.lora's settings; a model with rank 0 stays as it is."""
    if not config.rank:
        return []
    return add_lora(model, config.rank, config.alpha, config.dropout, tuple(config.target_modules))


def quantize_base(model: nn.Module, config: LoRAConfig) -> tuple[int, int]:
    """QLoRA: the adapted layers' frozen weights to int8 (train.lora.quantize; model/qlora.py), once the base is
    loaded; (bytes before, after) of this rank's share of them."""
    if config.quantize != "int8":
        return 0, 0
    return quantize_layers([m for m in model.modules() if isinstance(m, LoRALinear)])


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """The base model, adapters bypassed: a LoRA run's frozen reference (DPO's) without a second copy."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             targets: tuple[str, ...] = TARGETS) -> list[str]:
    """Adapt the model's linear layers named by `targets` in place and freeze every other parameter but a score
    head's; returns the adapted modules' names. A ConfigError names what cannot be adapted: a target that matches
    no layer, a rank above a layer's smaller dimension."""
    unknown = sorted(set(targets) - {name.rpartition(".")[2] for name, m in model.named_modules()
                                     if isinstance(m, nn.Linear)})
    if unknown:
        raise ConfigError(f"train.lora.target_modules: {', '.join(unknown)} match no linear layer of the model; "
                          f"choose among {', '.join(TARGETS)}")
    adapted = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and name.rpartition(".")[2] in targets]
    for name, module in adapted:
        if not 0 < rank <= min(module.in_features, module.out_features):
            raise ConfigError(f"train.lora.rank={rank} must be between 1 and the smaller dimension of {name} "
                              f"({module.in_features} × {module.out_features}); lower it")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("score."))  # a score head is new: it trains beside the adapters
    for _, module in adapted:
        device, dtype = module.weight.device, module.weight.dtype
        module.lora_A = nn.Linear(module.in_features, rank, bias=False, device=device, dtype=dtype)
        module.lora_B = nn.Linear(rank, module.out_features, bias=False, device=device, dtype=dtype)
        module.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        module.scaling = alpha / rank
        module.__class__ = LoRALinear
    return [name for name, _ in adapted]


class BaseModel:
    """Calls a LoRA model with its adapters bypassed: what it was before training (DPO's reference). It holds no
    parameters of its own."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        with adapters_off(self.module):
            return self.module(*args, **kwargs)

    def parameters(self):
        return iter(())


def lora_initial_values(model: nn.Module, seed: int) -> Iterator[tuple[str, int, torch.Tensor]]:
    """(name, first row, values): peft's initial values of every adapter tensor, whole — lora_A Kaiming-uniform
    (a = √5, nn.Linear's own), lora_B zero — each drawn from a generator of its own name, so every rank and
    layout (a pipeline stage, a shard) gets the same values (parallel/materialize.py copies its slice)."""
    for name, parameter in lora_parameters(model).items():
        if ".lora_A." in name:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            bound = 1 / math.sqrt(parameter.shape[1])  # kaiming_uniform_(a=√5) on a fan-in of shape[1]
            yield name, 0, torch.empty(parameter.shape).uniform_(-bound, bound, generator=generator)
        else:
            yield name, 0, torch.zeros(parameter.shape)


@torch.no_grad()
def init_lora(model: nn.Module, seed: int) -> None:
    """A whole model's adapters given their initial values (lora_initial_values)."""
    parameters = lora_parameters(model)
    for name, _, values in lora_initial_values(model, seed):
        parameters[name].copy_(values)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters by name, the wrappers' prefixes (activation checkpointing) dropped: the same names under every
    layout, which their initial values are drawn from."""
    return {name.replace(_CHECKPOINT_PREFIX, ""): p for name, p in model.named_parameters() if is_adapter(name)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every update into its base weight (W + B·A·alpha/rank) and drop the adapters: a plain model."""
    for module in list(model.modules()):
        if isinstance(module, LoRALinear):
            module.weight += module.lora_B.weight @ module.lora_A.weight * module.scaling
            del module.lora_A, module.lora_B, module.lora_dropout, module.scaling
            module.__class__ = nn.Linear


def peft_config(rank: int, alpha: float, dropout: float, targets: tuple[str, ...], base: str) -> dict:
    """adapter_config.json as peft writes it for a causal LM."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
            "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(targets), "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
            "use_dora": False, "modules_to_save": None}


def save_peft_adapter(adapters: dict[str, torch.Tensor], out: Path, config: dict) -> None:
    """A PEFT adapter folder from our adapter tensors (our names): transformers' names under peft's prefix."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({PEFT_PREFIX + hf_name(name): t.detach().cpu().contiguous() for name, t in adapters.items()},
              str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
