"""raytrain's own engine: the policy as our Transformer, generating with its KV cache (model/generate.py)."""

from __future__ import annotations

import torch

from raytrain.model.generate import generate
from raytrain.model.transformer import Transformer, TransformerConfig
from raytrain.rlhf.engines.base import RolloutEngine
from raytrain.rlhf.weight_sync import model_parameters


class NativeEngine(RolloutEngine):
    name = "native"

    def __init__(self, model: dict, device: torch.device):
        with torch.device("meta"):  # the weights come with the first sync: no values to draw
            self.model = Transformer(TransformerConfig(**model)).eval()
        self.model.to_empty(device=device)
        self.model.reset_rotary(device)

    def parameters(self) -> dict[str, torch.Tensor]:
        return dict(model_parameters(self.model))

    def generate(self, prompts: list[list[int]], seeds: list[int],
                 settings: dict) -> tuple[list[list[int]], list[list[float]]]:
        logprobs: list[list[float]] = []
        return generate(self.model, prompts, seeds=seeds, logprobs=logprobs, **settings), logprobs

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.cpu() for key, value in self.model.state_dict().items()}


ENGINE = NativeEngine
