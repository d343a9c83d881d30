"""`raytrain ppo` (and `ppo.algorithm=grpo|rloo|reinforce++|dapo|gspo`): the policy from an SFT run, rewards
from a reward model, a Python function or a service, rollouts and rewards from Ray actor pools beside the learner's
Ray Train workers. The learner is the one loop; its batches come from the experience source
(rlhf/experience_source.py); the algorithm's math is in rlhf/algorithms/."""

from __future__ import annotations

import json
import logging

from raytrain import storage
from raytrain.config import Config
from raytrain.errors import ConfigError, DataError
from raytrain.model.config import TransformerConfig
from raytrain.rlhf.algorithms import ALGORITHMS
from raytrain.rlhf.objective import PolicyAndValue, PolicyObjective
from raytrain.stages.base import Stage
from raytrain.train.checkpoint import load_weights

log = logging.getLogger("raytrain")


class ProximalPolicyOptimisation(Stage):
    name = "ppo"
    order = 50
    help = "align a policy with PPO or GRPO: rollouts and rewards from Ray actor pools"
    objectives = tuple(ALGORITHMS)
    family = "ppo"
    objective_class = PolicyObjective
    sweep_metric = ("val/reward_mean", "max")
    weights_prefix = "policy."  # the value model sits beside it, under "value."
    pipeline = False
    whole_logits = True
    in_process = False  # its batches come from Ray actors

    @property
    def source_metrics(self) -> tuple[str, ...]:
        from raytrain.rlhf.experience_source import EXPERIENCE_METRICS

        return EXPERIENCE_METRICS

    def objective_of(self, config: Config) -> str:
        return config.ppo.algorithm

    def rounds(self, config: Config) -> int:
        return config.ppo.iterations

    def total_steps(self, config: Config) -> int:
        return config.ppo.iterations * config.ppo.epochs * config.ppo.minibatches

    def actor_resources(self, config: Config) -> dict[str, float]:
        ppo = config.ppo
        actors = ppo.rollout_actors + ppo.reward_actors
        return {"CPU": actors * ppo.actor_cpus, "GPU": actors * ppo.actor_gpus}

    def preflight(self, config: Config) -> Config:
        return self.resolve(config)[0]

    def cli_flags(self) -> list[tuple[str, str, dict]]:
        return [
            ("--policy", "ppo.policy", {"metavar": "CKPT|RUN", "help": "the policy to start from (an SFT run); "
                                                                      "the KL reference too"}),
            ("--reward", "ppo.reward", {"metavar": "CKPT|RUN|python:mod:fn|http://HOST:PORT/PATH",
                                        "help": "a reward model (`raytrain reward` run), a Python function "
                                                "(prompts, responses) -> list[float], or a service taking them "
                                                "as JSON"}),
            ("--prompts", "ppo.prompts", {"metavar": "SRC", "help": "'stdlib-qa', or JSONL files/folders of "
                                                                   "'prompt' or 'messages' records"}),
            ("--name", "run.name", {"help": "run name; rerunning a name resumes it"}),
            ("--iterations", "ppo.iterations", {"type": int, "help": "rollout → update iterations"}),
            ("--algorithm", "ppo.algorithm", {"choices": list(self.objectives)}),
            ("--workers", "parallel.workers", {"type": int, "help": "Ray Train workers of the learner"}),
        ]

    def resolve(self, config: Config) -> tuple[Config, dict]:
        """Everything that can be checked before an actor or worker starts: the config the workers run (frozen),
        and what they read (prompts.json): the prompts' token ids, the row length and the checkpoints the models
        start from."""
        from raytrain.data.tokenizer import load_tokenizer
        from raytrain.rlhf.actors import call_reward, reward_function
        from raytrain.rlhf.experience import round_up
        from raytrain.rlhf.prompts import PromptSet, load_prompts
        from raytrain.tasks import is_verifier
        from raytrain.train.checkpoint import model_head, read_checkpoint_meta, resolve_checkpoint

        ppo, train = config.ppo, config.train
        if not ppo.policy:
            raise ConfigError("PPO starts from a policy: pass --policy runs/NAME (an SFT run) or a checkpoint "
                              "folder (ppo.policy)")
        if not ppo.reward:
            raise ConfigError("PPO needs a reward: pass --reward runs/NAME (a `raytrain reward` run), a checkpoint "
                              "folder, python:module:function or http://HOST:PORT/PATH (ppo.reward)")
        if not ppo.prompts:
            raise ConfigError("PPO needs prompts: pass --prompts stdlib-qa or JSONL files of 'prompt' records "
                              "(ppo.prompts)")
        policy = str(resolve_checkpoint(ppo.policy))
        meta = read_checkpoint_meta(policy)
        if model_head(meta) != "lm":
            raise DataError(f"--policy '{ppo.policy}' is a reward model; start PPO from a language model (an SFT "
                            "run)")
        reward = value_init = policy
        function = reward_function(ppo.reward)
        if function is not None:  # a Python function or a service: tried once before anything starts
            call_reward(function, ppo.reward, ["What does len do?"], ["Return the length."])
            reward = ppo.reward
        else:
            reward = value_init = str(resolve_checkpoint(ppo.reward))
            reward_meta = read_checkpoint_meta(reward)
            if model_head(reward_meta) != "score" or "reward" not in reward_meta:
                raise DataError(f"--reward '{ppo.reward}' is not a reward model (its stage trained "
                                f"'{reward_meta.get('objective')}'); pass a `raytrain reward` run or python:mod:fn")
            if reward_meta["tokenizer"]["sha256"] != meta["tokenizer"]["sha256"]:
                raise DataError(f"--reward '{ppo.reward}' and --policy '{ppo.policy}' use different tokenizers; "
                                "train the reward model from this policy's line of checkpoints")
            if TransformerConfig(**reward_meta["model"]) != TransformerConfig(**meta["model"]):
                raise DataError(f"--reward '{ppo.reward}' has another architecture than the policy; the value "
                                "model starts from it, so it must match the policy's model")
        from raytrain.rlhf.engines import ENGINES

        engine_problems = ENGINES[ppo.rollout_engine].problems(meta["model"], gpu=ppo.actor_gpus > 0)
        if engine_problems:
            raise ConfigError(f"ppo.rollout_engine={ppo.rollout_engine}: " + "; ".join(engine_problems))
        tokenizer = load_tokenizer(meta["tokenizer"]["path"])  # a folder or a URI
        prompts = load_prompts(ppo.prompts, tokenizer, train.seed, config.data.prepare.val_fraction,
                               config.data.chat.prompt_field, config.data.chat.messages_field)
        max_seq_len = meta["model"]["max_seq_len"]  # the policy's own architecture, whatever the config says
        room = max_seq_len - ppo.max_new_tokens
        long = sum(len(p) > room for p in prompts.train + prompts.val)
        if long and not ppo.drop_long_prompts:
            raise DataError(f"{long} prompts (the longest {prompts.longest} tokens) leave no room for "
                            f"ppo.max_new_tokens={ppo.max_new_tokens} within the policy's max_seq_len "
                            f"{max_seq_len}; shorten them, lower ppo.max_new_tokens, or skip them with "
                            "ppo.drop_long_prompts=true")
        if long:
            log.info("ppo: skipping %d prompts longer than %d tokens (ppo.drop_long_prompts)", long, room)
            prompts = PromptSet([p for p in prompts.train if len(p) <= room],
                                [p for p in prompts.val if len(p) <= room])
        if not prompts.train:
            raise DataError(f"no training prompt fits in {room} tokens; lower ppo.max_new_tokens")
        length = min(round_up(prompts.longest + ppo.max_new_tokens, config.parallel.tp), max_seq_len)
        resolved = config.with_values({
            "model": meta["model"], "ppo.policy": policy, "ppo.reward": reward,
            # The one loop's step is one optimizer step on a minibatch of responses.
            "train.objective": ppo.algorithm,
            "train.global_batch": ppo.prompts_per_iteration * ppo.samples_per_prompt // ppo.minibatches,
            "train.steps": self.total_steps(config), "train.data": "", "train.init_from": "",
            "parallel.loss_parallel": False})  # log-probs need whole logits
        self.check_layout(resolved, length)
        self.check_lora(resolved, policy)
        spec = {"train": prompts.train, "val": prompts.val, "length": length, "policy": policy,
                "value_init": value_init, "tokenizer": meta["tokenizer"], "special": tokenizer.special,
                "mask_fraction": meta.get("mask_fraction", 0.15),
                # A task's verifier scores 1 or 0: the held-out mean is exact-match accuracy (val/accuracy).
                "verifier": is_verifier(function)}
        return resolved, spec

    def run(self, config: Config, callbacks: tuple = ()) -> dict:
        from raytrain.cluster.resources import check_placement, use_gpus
        from raytrain.rlhf.actors import HTTP_REWARDS, PYTHON_REWARD, ActorPools
        from raytrain.rlhf.experience_source import PROMPTS_FILE
        from raytrain.runtime import init_ray
        from raytrain.train.launch import fit

        resolved, spec = self.resolve(config)
        ppo = resolved.ppo
        init_ray(resolved.runtime)
        check_placement(resolved, use_gpus(resolved), f" plus {ppo.rollout_actors + ppo.reward_actors} actors × "
                                                      f"ppo.actor_cpus={ppo.actor_cpus}",
                        self.actor_resources(resolved)["CPU"])
        run_dir = resolved.run.location  # a path or a URI
        storage.write_text(storage.join(run_dir, PROMPTS_FILE), json.dumps(spec))
        log.info("ppo: %d train / %d held-out prompts; %d rollout and %d reward actor(s) (%s reward)",
                 len(spec["train"]), len(spec["val"]), ppo.rollout_actors, ppo.reward_actors,
                 "Python" if ppo.reward.startswith(PYTHON_REWARD) else "HTTP" if ppo.reward.startswith(HTTP_REWARDS)
                 else "model")
        pools = ActorPools.create(ppo, vars(resolved.model), ppo.reward, ppo.policy, spec["tokenizer"]["path"],
                                  spec["special"]["pad"])
        try:
            summary = fit(resolved, self, f"{ppo.iterations} iterations of {ppo.prompts_per_iteration} prompts × "
                                          f"{ppo.samples_per_prompt} samples ({ppo.algorithm})", callbacks,
                          extras={"pools": ActorPools(pools.rollout, pools.reward)})  # names, not handles
            summary.update(rollout_engine=ppo.rollout_engine, **rollout_check(pools, summary["checkpoint"], spec, ppo))
            # The monitors of ppo.stop_on that ended the run (their flags are in its last logged record).
            summary["stopped_by"] = [name for name in ppo.stop_on if summary["final"].get(f"health/{name}")]
            storage.write_text(storage.join(run_dir, "summary.json"), json.dumps(summary, indent=2))
            return summary
        finally:
            pools.kill()

    # -- hooks on the workers ---------------------------------------------------------------------------

    def batch_source(self, worker):
        from raytrain.rlhf.experience_source import ExperienceSource

        return ExperienceSource(worker)

    def build_model(self, worker):
        """The policy and, for an algorithm with a critic (PPO), the value model (a score head on every
        position) beside it; under train.lora both adapted (the value model's score head trains whole)."""
        import torch

        from raytrain.model.lora import apply_lora
        from raytrain.model.transformer import Transformer

        def built(head: str, seed: int) -> tuple[Transformer, torch.nn.Module]:
            with torch.device("meta"):
                model = Transformer(worker.config.model, head=head)
            apply_lora(model, worker.train.lora)
            return model, worker.parallelize(model, seed)

        policy, policy_module = built("lm", worker.train.seed)
        critic = ALGORITHMS[worker.config.ppo.algorithm].critic
        value, value_module = built("score", worker.train.seed + 1) if critic else (None, None)
        return [PolicyAndValue(policy, value)], [PolicyAndValue(policy_module, value_module)], [0]

    def lora_base(self, worker) -> str:
        return worker.source.spec["policy"]

    def start_fresh(self, worker) -> None:
        """A new run: the policy from --policy, the value model from the reward model."""
        (module,) = worker.modules
        spec = worker.source.spec
        load_weights(spec["policy"], module.policy)
        if module.value is not None:
            load_weights(spec["value_init"], module.value)


def rollout_check(pools, checkpoint: str | None, spec: dict, ppo) -> dict:
    """How a rollout actor's engine stands after the last sync against the final checkpoint's policy: the largest
    weight difference (0 when the sync delivered the trained weights; for vLLM, delivered into the buffers it
    reloads from) and the share of (up to 8) held-out prompts whose greedy answer from the engine equals our own
    generation from the checkpoint (1.0 when the engine generates from those weights, under its own kernels:
    what shows that vLLM took them). None for both when the actor restarted after the last sync."""
    import ray

    from raytrain.model.generate import generate
    from raytrain.rlhf.actors import NAMESPACE, rollout_settings
    from raytrain.rlhf.weight_sync import model_parameters
    from raytrain.train.checkpoint import load_model

    actor = ray.get_actor(pools.rollout[0], namespace=NAMESPACE)
    version, weights = ray.get(actor.weights.remote())
    if checkpoint is None or version is None:  # nothing trained, or the actor restarted since the last sync
        return {"rollout_weights_max_diff": None, "rollout_greedy_agreement": None}
    model, _ = load_model(checkpoint)
    prompts = (spec["val"] or spec["train"])[:8]
    seeds = list(range(len(prompts)))
    settings = {**rollout_settings(ppo, spec["special"], 0.0), "top_k": 0, "top_p": 1.0}
    responses, _ = actor.generate.remote(version, prompts, seeds, settings)
    ours = generate(model.eval(), prompts, seeds=seeds, **settings)
    agree = sum(a == b for a, b in zip(ray.get(responses), ours, strict=True))
    return {"rollout_weights_max_diff": max(float((weights[name] - p.detach()).abs().max())
                                            for name, p in model_parameters(model)),
            "rollout_greedy_agreement": agree / len(prompts)}


STAGE = ProximalPolicyOptimisation()
