"""`raytrain ppo`: check everything, start the actor pools, run the learner on Ray Train, stop the pools."""

from __future__ import annotations

import json
import logging

import ray

from raytrain import storage
from raytrain.config import Config
from raytrain.data.tokenizer import load_tokenizer, special_token_ids
from raytrain.errors import ConfigError, DataError
from raytrain.model.transformer import TransformerConfig
from raytrain.rlhf.actors import NAMESPACE, PYTHON_REWARD, ActorPools, call_reward, import_reward
from raytrain.rlhf.experience import round_up
from raytrain.rlhf.learner import PROMPTS_FILE, ppo_worker
from raytrain.rlhf.prompts import PromptSet, load_prompts
from raytrain.runtime import init_ray
from raytrain.train.checkpoint import load_model, model_head, read_checkpoint_meta, resolve_checkpoint
from raytrain.train.launch import check_layout, check_placement, fit, use_gpus

log = logging.getLogger("raytrain")


def check_ppo_config(config: Config) -> dict:
    """Everything that can be checked before an actor or worker starts; returns what the workers read
    (prompts.json): the prompts' token ids, the row length and the checkpoints the models start from."""
    ppo, train = config.ppo, config.train
    if not ppo.policy:
        raise ConfigError("PPO starts from a policy: pass --policy runs/NAME (an SFT run) or a checkpoint folder "
                          "(ppo.policy)")
    if not ppo.reward:
        raise ConfigError("PPO needs a reward: pass --reward runs/NAME (a `raytrain reward` run), a checkpoint "
                          "folder, or python:module:function (ppo.reward)")
    if not ppo.prompts:
        raise ConfigError("PPO needs prompts: pass --prompts stdlib-qa or JSONL files of 'prompt' records "
                          "(ppo.prompts)")
    policy = storage.absolute(resolve_checkpoint(ppo.policy))
    meta = read_checkpoint_meta(policy)
    if model_head(meta) != "lm":
        raise DataError(f"--policy '{ppo.policy}' is a reward model; start PPO from a language model (an SFT run)")
    # The policy's own architecture, whatever the config's model section says.
    config.model = TransformerConfig(**meta["model"])
    ppo.policy = str(policy)
    value_init = str(policy)
    if ppo.reward.startswith(PYTHON_REWARD):
        call_reward(import_reward(ppo.reward), ppo.reward, ["What does len do?"], ["Return the length."])
    else:
        reward = storage.absolute(resolve_checkpoint(ppo.reward))
        reward_meta = read_checkpoint_meta(reward)
        if model_head(reward_meta) != "score" or "reward" not in reward_meta:
            raise DataError(f"--reward '{ppo.reward}' is not a reward model (its stage trained "
                            f"'{reward_meta.get('objective')}'); pass a `raytrain reward` run or python:mod:fn")
        if reward_meta["tokenizer"]["sha256"] != meta["tokenizer"]["sha256"]:
            raise DataError(f"--reward '{ppo.reward}' and --policy '{ppo.policy}' use different tokenizers; train "
                            "the reward model from this policy's line of checkpoints")
        if reward_meta["model"] != meta["model"]:
            raise DataError(f"--reward '{ppo.reward}' has another architecture than the policy; the value model "
                            "starts from it, so it must match the policy's model")
        ppo.reward = value_init = str(reward)
    tokenizer_dir = meta["tokenizer"]["path"]  # a folder or a URI
    tokenizer = load_tokenizer(tokenizer_dir)
    prompts = load_prompts(ppo.prompts, tokenizer, train.seed, config.data.prepare.val_fraction,
                           config.data.chat.prompt_field, config.data.chat.messages_field)
    room = config.model.max_seq_len - ppo.max_new_tokens
    long = sum(len(p) > room for p in prompts.train + prompts.val)
    if long and not ppo.drop_long_prompts:
        raise DataError(f"{long} prompts (the longest {prompts.longest} tokens) leave no room for "
                        f"ppo.max_new_tokens={ppo.max_new_tokens} within the policy's max_seq_len "
                        f"{config.model.max_seq_len}; shorten them, lower ppo.max_new_tokens, or skip them with "
                        "ppo.drop_long_prompts=true")
    if long:
        log.info("ppo: skipping %d prompts longer than %d tokens (ppo.drop_long_prompts)", long, room)
        prompts = PromptSet([p for p in prompts.train if len(p) <= room], [p for p in prompts.val if len(p) <= room])
    if not prompts.train:
        raise DataError(f"no training prompt fits in {room} tokens; lower ppo.max_new_tokens")
    length = min(round_up(prompts.longest + ppo.max_new_tokens, config.parallel.tp), config.model.max_seq_len)
    # The one loop's step is one optimizer step on a minibatch of responses.
    train.objective = ppo.algorithm
    train.global_batch = ppo.prompts_per_iteration * ppo.samples_per_prompt // ppo.minibatches
    train.steps = ppo.iterations * ppo.epochs * ppo.minibatches
    train.data = train.init_from = ""
    config.parallel.loss_parallel = False  # log-probs need whole logits
    check_layout(config, length)
    return {"train": prompts.train, "val": prompts.val, "length": length, "policy": ppo.policy,
            "value_init": value_init, "tokenizer": meta["tokenizer"],
            "special": special_token_ids(tokenizer), "mask_fraction": meta.get("mask_fraction", 0.15)}


def run_ppo(config: Config, callbacks: tuple = ()) -> dict:
    """`raytrain ppo` (and `ppo.algorithm=grpo`): the policy from an SFT run, rewards from a reward model or a
    Python function, rollouts and rewards from actor pools beside the learner's Ray Train workers."""
    spec = check_ppo_config(config)
    ppo = config.ppo
    init_ray(config.runtime)
    actors = (ppo.rollout_actors + ppo.reward_actors) * ppo.actor_cpus
    check_placement(config, use_gpus(config), f" plus {ppo.rollout_actors + ppo.reward_actors} actors × "
                                              f"ppo.actor_cpus={ppo.actor_cpus}", actors)
    run_dir = config.run.location  # a path or a URI
    storage.write_text(storage.join(run_dir, PROMPTS_FILE), json.dumps(spec))
    log.info("ppo: %d train / %d held-out prompts; %d rollout and %d reward actor(s) (%s reward)", len(spec["train"]),
             len(spec["val"]), ppo.rollout_actors, ppo.reward_actors,
             "Python" if ppo.reward.startswith(PYTHON_REWARD) else "model")
    pools = ActorPools.create(ppo, vars(config.model), ppo.reward, ppo.policy, spec["tokenizer"]["path"],
                              spec["special"]["pad"])
    try:
        summary = fit(config, ppo_worker, f"{ppo.iterations} iterations of {ppo.prompts_per_iteration} prompts × "
                                          f"{ppo.samples_per_prompt} samples ({ppo.algorithm})", callbacks,
                      pools={"rollout": pools.rollout, "reward": pools.reward})
        summary["rollout_weights_max_diff"] = synced_weights_diff(pools, summary["checkpoint"])
        storage.write_text(storage.join(run_dir, "summary.json"), json.dumps(summary, indent=2))
        return summary
    finally:
        pools.kill()


def synced_weights_diff(pools: ActorPools, checkpoint: str | None) -> float | None:
    """The largest difference between a rollout actor's weights and the final checkpoint's policy: 0 when the
    last sync delivered the trained weights."""
    if checkpoint is None:
        return None
    model, _ = load_model(checkpoint)
    actor = ray.get_actor(pools.rollout[0], namespace=NAMESPACE)
    _, weights = ray.get(actor.weights.remote())
    return max(float((weights[k] - v).abs().max()) for k, v in model.state_dict().items())

