"""PPO, GRPO and DPO math as pure functions on response tensors (no Ray, no model).

Shapes: a batch of B responses right-padded to T tokens; `mask` [B, T] marks real response tokens
(1) and padding after <|eos|> or the length cap (0). Per-token log-probs are those of the sampled
tokens. Sums, not means, come back wherever the caller normalises over a global batch, as the one
training loop does (a step's gradient is then the same under any data-parallel layout).

The recipe follows OpenRLHF's defaults (veRL agrees where both have them): k1 KL in the reward,
the reward-model score clipped and added at the last response token, GAE, whitened advantages,
clipped policy and value losses; GRPO's group-normalised advantages with k3 KL in the loss; DPO.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from the sampled tokens, Δ = log π − log π_ref (Schulman, 2020):

    k1 = Δ (unbiased, can be negative: the reward's penalty), k3 = e^(−Δ) − 1 + Δ (unbiased and ≥ 0: GRPO's loss).
    """
    delta = logp - ref_logp
    if kind == "k1":
        return delta
    if kind == "k3":
        return torch.expm1(-delta) + delta
    raise ValueError(f"KL estimator {kind!r} is not one of k1, k3")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each response's last real token (0 for an empty response)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask.long()).amax(dim=1)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                  score_clip: float) -> torch.Tensor:
    """r_t = −β·KL_t on every response token, plus the score clipped to ±score_clip at the last one.

    scores [B] (already normalised by the reward model's statistics), kl [B, T] → rewards [B, T], 0 on padding.
    """
    rewards = -kl_coef * kl * mask
    last = last_token_index(mask)
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last] += scores.clamp(-score_clip, score_clip)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response (Schulman et al., 2016).

    δ_t = r_t + γ·V_{t+1} − V_t with V after the last real token taken as 0 (the episode ends there);
    A_t = δ_t + γλ·A_{t+1}; returns R_t = A_t + V_t. Padding gets A = R = 0.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def masked_mean_std(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) standard deviation of x over the masked entries."""
    mask = mask.to(x.dtype)
    count = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / count
    return mean, (((x - mean) * mask).pow(2).sum() / count).sqrt()


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the batch's response tokens; 0 on padding."""
    mean, std = masked_mean_std(x, mask)
    return (x - mean) / (std + eps) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
                clip_low: float, clip_high: float,
                tis: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate: Σ_t w_t·c_t·−min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A), ρ = exp(log π − log π_old).

    weights: the response mask (a token mean once the loop divides by the token count) or GSPO's 1/|y| per
    token. ε_high > ε_low is DAPO's clip-higher. tis: c_t, the truncated importance weight min(π_old/π_engine,
    C) of a token sampled by another engine or older weights (Yao et al., 2025), 1 if None. Returns weighted
    sums: (loss, clipped, approximate KL between π_old and π); only the loss carries c.
    """
    return _clipped(logp - old_logp, logp, old_logp, advantages, weights, clip_low, clip_high, tis)


def sequence_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                         weights: torch.Tensor, clip_low: float, clip_high: float,
                         tis: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GSPO (Zheng et al., 2025): the clipped surrogate of the sequence ratio s = exp(mean_t log π/π_old).

    Per token the ratio is sg[s]·π_t/sg[π_t] (GSPO-token): its value is s, its gradient s·∇log π_t, so with
    weights 1/|y| per token the sums are GSPO's per-sequence loss and gradient.
    """
    mask = (weights > 0).to(logp.dtype)
    length = mask.sum(dim=1, keepdim=True).clamp(min=1)
    sequence = (((logp - old_logp) * mask).sum(dim=1, keepdim=True) / length).detach()
    return _clipped(sequence + logp - logp.detach(), logp, old_logp, advantages, weights, clip_low, clip_high, tis)


def _clipped(log_ratio: torch.Tensor, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
             weights: torch.Tensor, clip_low: float, clip_high: float,
             tis: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weights = weights.to(logp.dtype)
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    loss = (-torch.minimum(unclipped, clipped) * weights * (1 if tis is None else tis)).sum()
    clipfrac = ((clipped < unclipped).to(logp.dtype) * weights).sum().detach()
    # The tokens were sampled from π_old: k3 of KL(π_old‖π), (ρ − 1) − log ρ (Schulman's approx_kl).
    approx_kl = (kl_estimate(old_logp, logp, "k3") * weights).sum().detach()
    return loss, clipfrac, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """Σ_t 0.5·max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, ±clip), over the mask."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    worst = torch.maximum((values - returns).pow(2), (clipped - returns).pow(2))
    return (0.5 * worst * mask.to(values.dtype)).sum()


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over masked positions of the policy's entropy −Σ_v p_v log p_v."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return (-(log_probs.exp() * log_probs).sum(-1) * mask.to(log_probs.dtype)).sum()


class AdaptiveKLController:
    """Ziegler et al. (2019): keep the measured KL near `target` by adjusting β.

    e = clip(KL / target − 1, −0.2, 0.2); β ← β·(1 + e·n / horizon), n the samples of the batch.
    """

    def __init__(self, init: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, samples: int) -> float:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * samples / self.horizon
        return self.value


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: rewards [P, G] of G samples per prompt → (R − mean_group) / (std_group + ε).

    The sample standard deviation (G − 1 in the denominator), as DeepSeekMath's reference does; each
    response's advantage applies to all its tokens.
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al., 2024): rewards [P, G] → R_i − mean of the other G − 1 samples of its prompt."""
    group = rewards.shape[1]
    return (rewards - rewards.mean(dim=1, keepdim=True)) * group / (group - 1)


def varied_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[P] True where the G samples of a prompt did not all get the same reward (DAPO keeps only those: a
    group of equal rewards has no advantage to learn from)."""
    return (rewards.amax(dim=1) - rewards.amin(dim=1)) > 0


def truncated_importance_weights(learner_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """min(π_learner/π_engine, cap) per response token (1 with cap 0: no correction), 0 on padding: how much a
    token sampled by the engine counts in the learner's policy loss."""
    if cap == 0:
        return mask.clone()
    return (learner_logp - engine_logp).exp().clamp(max=cap) * mask


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_new_tokens − buffer tokens, then falling linearly to −1 at
    max_new_tokens."""
    excess = (lengths - (max_new_tokens - buffer)).clamp(min=0)
    return -(excess / buffer).clamp(max=1)


def token_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token under the logits that predicted it: logits [B, T, V], tokens [B, T]."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)
