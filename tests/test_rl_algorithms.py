"""RLOO, REINFORCE++, DAPO and GSPO against values computed by hand (no Ray, no model), and what every
algorithm of the registry promises."""

import math

import pytest
import torch

from raytrain.config import PPOConfig, load_config
from raytrain.model.transformer import Transformer
from raytrain.rlhf.algorithms import ALGORITHMS
from raytrain.rlhf.algorithms.base import Rollout
from raytrain.rlhf.engines import ENGINES
from raytrain.rlhf.experience import on_grid, response_logp, rollout_tensors
from raytrain.rlhf.ppo_math import (
    leave_one_out_advantages,
    overlong_penalty,
    policy_loss,
    sequence_policy_loss,
    truncated_importance_weights,
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


def test_truncated_importance_weights_and_their_place_in_the_loss():
    learner = torch.log(torch.tensor([[0.5, 0.9, 0.2], [0.3, 0.6, 0.1]]))
    engine = torch.log(torch.tensor([[0.5, 0.3, 0.4], [0.6, 0.2, 0.9]]))
    weights = truncated_importance_weights(learner, engine, MASK, cap=2.0)
    close = pytest.approx([1.0, 2.0, 0.5, 0.5, 2.0, 0.0])  # 0.9/0.3 = 3 and 0.6/0.2 = 3 are capped at 2
    assert weights.flatten().tolist() == close
    assert torch.equal(truncated_importance_weights(learner, engine, MASK, cap=0), MASK)  # off
    # The weight scales each token's policy loss only: with ρ = 1 the loss is −Σ c_t·A_t.
    adv = torch.ones(2, 3)
    loss, clipped, approx_kl = policy_loss(learner, learner, adv, MASK, 0.2, 0.2, weights)
    assert loss.item() == pytest.approx(-(1 + 2 + 0.5 + 0.5 + 2)) and clipped == 0 and approx_kl == 0


def test_the_native_engine_gives_the_learners_log_probs_of_its_samples():
    config = load_config("tiny").model
    learner = Transformer(config)
    learner.init_weights(3)
    engine = ENGINES["native"](vars(config), torch.device("cpu"))
    with torch.no_grad():
        for name, tensor in engine.parameters().items():
            tensor.copy_(learner.state_dict()[name])
    engine.loaded()
    prompts = [[4, 10, 11, 12], [4, 13]]
    settings = {"max_new_tokens": 6, "stop_ids": (), "pad_id": 2, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    responses, logprobs = engine.generate(prompts, [5, 6], settings)
    assert [len(r) for r in responses] == [len(lp) for lp in logprobs] == [6, 6]
    tokens, mask, _ = rollout_tensors(prompts, responses, logprobs, 12, 2)
    with torch.no_grad():
        learned = response_logp(learner(tokens), tokens)
    # The KV cache and a full forward pass differ only in rounding.
    torch.testing.assert_close(on_grid(prompts, logprobs, 12), learned * mask, atol=1e-5, rtol=0)
    again, _ = engine.generate(prompts[::-1], [6, 5], settings)
    assert again == responses[::-1]  # a sample depends on its seed, not its batch
