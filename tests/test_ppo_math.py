"""PPO, GRPO and DPO math against values computed by hand (no Ray, no model)."""

import math

import pytest
import torch

from raytrain.rlhf.ppo_math import (
    AdaptiveKLController,
    entropy,
    gae,
    group_advantages,
    kl_estimate,
    last_token_index,
    policy_loss,
    token_logp,
    token_rewards,
    value_loss,
    whiten,
)


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-5, atol=1e-6)


MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second response ends after two tokens


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])  # Δ = 0.5, −1
    assert kl_estimate(logp, ref, "k1").tolist() == [0.5, -1.0]
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx([math.exp(-0.5) - 1 + 0.5, math.exp(1) - 1 - 1])
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(logp, ref, "k2")  # the product uses k1 and k3 only


def test_rewards_are_kl_penalties_plus_the_clipped_score_at_the_last_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    assert last_token_index(MASK).tolist() == [2, 1]
    rewards = token_rewards(torch.tensor([2.0, -20.0]), kl, MASK, kl_coef=0.1, score_clip=10.0)
    close(rewards, [[-0.01, -0.02, -0.03 + 2.0], [-0.04, -0.05 - 10.0, 0.0]])


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, -1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [0.1, 0.3, 7.0]])  # 7.0 lies on padding: ignored
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, MASK, gamma, lam)
    # Response 1: δ2 = 1 − 0.4 = 0.6; δ1 = 0 + 0.9·0.4 − 0.2 = 0.16; δ0 = 0 + 0.9·0.2 − 0.5 = −0.32.
    a2 = 0.6
    a1 = 0.16 + gamma * lam * a2
    a0 = -0.32 + gamma * lam * a1
    # Response 2 ends at t = 1: δ1 = −1 − 0.3 = −1.3; δ0 = 0.5 + 0.9·0.3 − 0.1 = 0.67.
    b1 = -1.3
    b0 = 0.67 + gamma * lam * b1
    close(advantages, [[a0, a1, a2], [b0, b1, 0.0]])
    close(returns, [[a0 + 0.5, a1 + 0.2, a2 + 0.4], [b0 + 0.1, b1 + 0.3, 0.0]])
    # γ = λ = 1 (OpenRLHF's default): the advantage is the return to go minus the value.
    advantages, _ = gae(rewards, values, MASK, 1.0, 1.0)
    assert advantages[0].tolist() == pytest.approx([1 - 0.5, 1 - 0.2, 1 - 0.4])


def test_whitening_uses_response_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    white = whiten(x, MASK)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (values - 3.0) / values.std(unbiased=False)
    assert white[MASK.bool()].tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    assert white[1, 2] == 0


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 0.9, 1.0], [0.5, 1.1, 3.0]]))  # ratios; 3.0 lies on padding
    adv = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 2.0, 5.0]])
    loss, clipfrac, approx_kl = policy_loss(logp, old, adv, MASK, 0.2, 0.2)
    # −min(ρA, clip(ρ)A): 1.5·1 → clipped 1.2; 0.9·1 → 0.9; 1·(−1) → −1; 0.5·(−1) → clipped 0.8·(−1); 1.1·2 → 2.2.
    assert loss.item() == pytest.approx(-(1.2 + 0.9 - 1.0 - 0.8 + 2.2))
    assert clipfrac.item() == 2  # the two tokens whose ratio left [0.8, 1.2] in the direction that gains
    ratios = torch.tensor([1.5, 0.9, 1.0, 0.5, 1.1])
    assert approx_kl.item() == pytest.approx(float((ratios - 1 - ratios.log()).sum()), rel=1e-6)


def test_clipped_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    values = torch.tensor([[1.0, 0.2, -0.1], [0.3, -2.0, 9.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0], [0.3, 1.0, 0.0]])
    loss = value_loss(values, old, returns, MASK, clip=0.5)
    # max((V − R)², (V_clip − R)²): (1, 2.25); (0.04, 0.04); (0.01, 0.01); (0, 0); (9, 2.25).
    assert loss.item() == pytest.approx(0.5 * (2.25 + 0.04 + 0.01 + 0.0 + 9.0))


def test_entropy_and_token_log_probs():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    assert entropy(logits, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(math.log(2))
    logp = token_logp(logits, torch.tensor([[1, 0]]))
    close(logp, [[math.log(0.5), math.log(0.9)]])
    assert logp.sum().item() == pytest.approx(math.log(0.45))


def test_adaptive_kl_controller():
    controller = AdaptiveKLController(init=0.1, target=6.0, horizon=10000)
    assert controller.update(kl=12.0, samples=1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped to 0.2
    assert controller.update(kl=5.4, samples=1000) == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))


def test_grpo_group_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    advantages = group_advantages(rewards)
    std = math.sqrt(1 / 3)  # sample std of (1, 0, 0, 1)
    assert advantages[0].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std], rel=1e-5)
    assert advantages[1].tolist() == [0.0] * 4  # one reward for the whole group: nothing to learn
