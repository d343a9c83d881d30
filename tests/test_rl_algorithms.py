"""RLOO, REINFORCE++, DAPO and GSPO against values computed by hand (no Ray, no model), and what every
algorithm of the registry promises."""

import math

import pytest
import torch

from raytrain.config import PPOConfig
from raytrain.rlhf.algorithms import ALGORITHMS
from raytrain.rlhf.algorithms.base import Rollout
from raytrain.rlhf.ppo_math import (
    leave_one_out_advantages,
    overlong_penalty,
    policy_loss,
    sequence_policy_loss,
    varied_groups,
    whiten,
)

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second response ends after two tokens


def rollout(scores, old, ref, mask, group, kl_coef) -> Rollout:
    return Rollout(torch.tensor(scores), torch.tensor(old), torch.tensor(ref), torch.zeros_like(mask), mask, group,
                   kl_coef)


def test_leave_one_out_baseline():
    advantages = leave_one_out_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    assert advantages[0].tolist() == pytest.approx([1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3])


def test_rloo_takes_the_sequence_kl_out_of_the_reward_before_the_baseline():
    mask = torch.ones(3, 2)
    # k1 summed over each response: 1.0, 0, 0; with β = 0.5 the rewards are 0.5, 0, 2.
    old = [[0.5, 0.5], [0.0, 0.0], [0.1, -0.1]]
    advantages, _ = ALGORITHMS["rloo"].advantages(rollout([1.0, 0.0, 2.0], old, [[0.0] * 2] * 3, mask, 3, 0.5),
                                                  PPOConfig(algorithm="rloo", samples_per_prompt=3))
    expected = [0.5 - (0 + 2) / 2, 0 - (0.5 + 2) / 2, 2 - (0.5 + 0) / 2]
    assert advantages[:, 0].tolist() == pytest.approx(expected) and torch.equal(advantages[:, 0], advantages[:, 1])


def test_reinforce_plus_plus_baseline_returns_whitened_over_the_batch():
    # Scores 1 and 3 less their group mean 2: −1 and +1 at the last tokens; −β·k1 with β = 0.1 on every token.
    old = [[0.2, 0.0, 0.0], [0.0, 0.4, 0.9]]  # 0.9 lies on padding
    advantages, _ = ALGORITHMS["reinforce++"].advantages(rollout([1.0, 3.0], old, [[0.0] * 3] * 2, MASK, 2, 0.1),
                                                         PPOConfig(algorithm="reinforce++", samples_per_prompt=2))
    # Token rewards (−0.02, 0, −1) and (0, −0.04 + 1); returns to the end of each response (γ = 1):
    returns = torch.tensor([[-1.02, -1.0, -1.0], [0.96, 0.96, 0.0]])
    torch.testing.assert_close(advantages, whiten(returns, MASK))
    assert advantages[1, 2] == 0


def test_clip_higher_lets_a_rising_token_rise_further():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.25, 0.75]]))
    adv, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    # (0.2, 0.28): 1.25·1 stays; 0.75·(−1) is clipped to 0.8·(−1). Symmetric 0.2: both clip.
    loss, clipped, _ = policy_loss(logp, old, adv, mask, 0.2, 0.28)
    assert loss.item() == pytest.approx(-(1.25 - 0.8)) and clipped.item() == 1
    loss, clipped, _ = policy_loss(logp, old, adv, mask, 0.2, 0.2)
    assert loss.item() == pytest.approx(-(1.2 - 0.8)) and clipped.item() == 2
    assert ALGORITHMS["dapo"].clip(PPOConfig()) == (0.2, 0.28)
    assert ALGORITHMS["dapo"].clip(PPOConfig(clip=0.1)) == (0.1, 0.1)  # a clip set by hand is symmetric
    assert ALGORITHMS["dapo"].clip(PPOConfig(clip=0.1, clip_high=0.3)) == (0.1, 0.3)
    assert ALGORITHMS["ppo"].clip(PPOConfig()) == (0.2, 0.2)


def test_dynamic_sampling_and_overlong_penalty():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert varied_groups(rewards).tolist() == [False, True, False]
    # max_new_tokens 10, buffer 4: free up to 6 tokens, then −1/4 per token down to −1 at 10.
    penalty = overlong_penalty(torch.tensor([5.0, 6.0, 8.0, 10.0]), 10, 4)
    assert penalty.tolist() == [0.0, 0.0, -0.5, -1.0]


def test_gspo_sequence_ratio_value_and_gradient():
    old = torch.zeros(2, 3)
    # log-ratios (0.3, 0, −0.3) → mean 0, s = 1; (0.2, 0.4) → mean 0.3, s = e^0.3, beyond 1 + 4e-4: clipped.
    logp = torch.tensor([[0.3, 0.0, -0.3], [0.2, 0.4, 7.0]], requires_grad=True)
    adv = torch.tensor([[2.0] * 3, [1.0] * 3]) * MASK
    gspo = ALGORITHMS["gspo"]
    weights = gspo.token_weights(MASK)
    assert weights.sum().item() == 2  # a mean over sequences
    loss, clipped, _ = sequence_policy_loss(logp, old, adv, weights, *gspo.clip(PPOConfig()))
    assert loss.item() == pytest.approx(-(1.0 * 2) - (1 + 4e-4) * 1)
    assert clipped.item() == pytest.approx(1)  # one sequence clipped
    loss.backward()
    # The unclipped sequence: ∂/∂log π_t of −s·A is −s·A/|y| on each of its tokens; the clipped one: none.
    close = torch.tensor([[-2 / 3] * 3, [0.0, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, close)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_algorithm_gives_advantages_on_response_tokens_only(name):
    algorithm = ALGORITHMS[name]
    group = 2
    ppo = PPOConfig(algorithm=name, samples_per_prompt=group)
    torch.manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    batch = Rollout(torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3),
                    mask, group, 0.05)
    advantages, returns = algorithm.advantages(batch, ppo)
    assert advantages.shape == returns.shape == mask.shape
    assert torch.all(advantages[mask == 0] == 0) and torch.all(returns[mask == 0] == 0)
    assert torch.isfinite(advantages).all() and advantages.abs().sum() > 0
    assert math.isclose(algorithm.token_weights(mask).sum().item(), 4 if name == "gspo" else 9)
