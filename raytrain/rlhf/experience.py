"""A rollout batch as training rows: tokens and the per-token tensors PPO and GRPO train on.

Each sample is its prompt followed by its response, right-padded to one length L (causal attention lets
padding after a sequence change nothing before it). Per-token tensors sit on the *shifted* grid of L − 1
positions: entry t belongs to token t + 1, predicted by the logits at t. `mask` marks response tokens there.
Rows travel through the one loop as one float64 tensor [B, len(FIELDS), L] (token ids are exact in float64).
"""

from __future__ import annotations

import torch

from raytrain.rlhf.ppo_math import gae, group_advantages, kl_estimate, token_logp, token_rewards, whiten

FIELDS = ("tokens", "mask", "old_logp", "ref_logp", "advantages", "returns", "old_values")


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def rollout_tensors(prompts: list[list[int]], responses: list[list[int]], ref_logps: list[list[float]],
                    length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [B, L], response mask [B, L − 1], reference log-probs [B, L − 1]) of prompt + response rows."""
    batch = len(prompts)
    tokens = torch.full((batch, length), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, length - 1))
    ref = torch.zeros((batch, length - 1))
    for i, (prompt, response, logps) in enumerate(zip(prompts, responses, ref_logps, strict=True)):
        start, end = len(prompt), len(prompt) + len(response)
        tokens[i, :end] = torch.tensor(prompt + response)
        mask[i, start - 1 : end - 1] = 1
        ref[i, start - 1 : end - 1] = torch.tensor(logps)
    return tokens, mask, ref


def response_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, L − 1] log-probability of each next token under the logits [B, L, V] that predicted it."""
    return token_logp(logits[:, :-1], tokens[:, 1:])


def response_slices(logp: torch.Tensor, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
    """Each response's per-token values out of [B, L − 1] shifted-grid rows."""
    return [logp[i, len(p) - 1 : len(p) + len(r) - 1].tolist()
            for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] Σ_t k1 over each response: the sample estimate of KL(π‖π_ref) of the whole sequence."""
    return (kl_estimate(logp, ref_logp, "k1") * mask).sum(dim=1)


def ppo_advantages(scores: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor, kl_coef: float, score_clip: float, gamma: float,
                   lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO: r_t = −β·k1_t plus the clipped score at the last token; GAE with the value model; advantages
    whitened over the batch's response tokens. Returns (advantages, returns)."""
    rewards = token_rewards(scores, kl_estimate(old_logp, ref_logp, "k1"), mask, kl_coef, score_clip)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    return whiten(advantages, mask), returns


def grpo_advantages(scores: torch.Tensor, group: int, mask: torch.Tensor) -> torch.Tensor:
    """GRPO: each response's group-normalised reward on every one of its tokens (samples of a prompt are
    consecutive)."""
    return group_advantages(scores.view(-1, group)).reshape(-1, 1) * mask


def pack(tokens: torch.Tensor, **per_token: torch.Tensor) -> torch.Tensor:
    """[B, len(FIELDS), L] float64 rows; shifted-grid tensors get one trailing zero."""
    columns = [tokens.double()]
    for name in FIELDS[1:]:
        columns.append(torch.nn.functional.pad(per_token[name].double(), (0, 1)))
    return torch.stack(columns, dim=1)


def unpack(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fields of packed rows: tokens as long [b, L], the rest float32 on the shifted grid [b, L − 1]."""
    fields = {"tokens": rows[:, 0].long()}
    for index, name in enumerate(FIELDS[1:], start=1):
        fields[name] = rows[:, index, :-1].float()
    return fields
