"""What a rollout engine is: the policy's weights in a rollout actor, and generation from them."""

from __future__ import annotations

import torch


class RolloutEngine:
    name: str

    @classmethod
    def problems(cls, model: dict, gpu: bool) -> list[str]:
        """Why this engine cannot generate for the policy `model` here (checked before any actor starts)."""
        return []

    def __init__(self, model: dict, device: torch.device):
        """model: the policy's TransformerConfig as a dict; no weights until the first sync."""

    def parameters(self) -> dict[str, torch.Tensor]:
        """Our parameter names (as the learner's state dict has them) → the tensors a sync copies into."""
        raise NotImplementedError

    def loaded(self) -> None:
        """Every tensor of a new version has been copied in (an engine that keeps its own layout takes it now)."""

    def generate(self, prompts: list[list[int]], seeds: list[int],
                 settings: dict) -> tuple[list[list[int]], list[list[float]]]:
        """(new tokens per prompt, each one's log-probability under the raw logits); settings: max_new_tokens,
        stop_ids, pad_id, temperature, top_k, top_p. Sample i depends on seeds[i] only, not on its batch."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights it generates with (on the CPU): the stage checks them against the final checkpoint."""
        raise NotImplementedError
