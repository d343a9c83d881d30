"""`raytrain ppo`'s learner: the one loop's worker, its batches made by the rollout and reward actor pools.

Per iteration: sync the policy's weights to the rollout actors (gathered whole from the FSDP/TP shards,
versioned); rank 0 has the rollout pool generate responses to the iteration's prompts and the reward pool
score them and give the reference log-probs (responses go from rollout to reward actor as object refs);
every rank gets the batch, computes the old log-probs and values on its data-parallel slice, and the same
advantages from the whole batch; then `epochs` × `minibatches` optimizer steps of the one loop. Prompt
order, sampling seeds and minibatch order are functions of (seed, iteration), so a resumed run, or one with
more actors, sees the same batches.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

import ray
import ray.train
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from raytrain import storage
from raytrain.config import config_from_dict
from raytrain.data.stream import BatchOrder
from raytrain.data.tokenizer import load_tokenizer
from raytrain.model.flops import train_flops_per_token
from raytrain.model.transformer import Transformer
from raytrain.parallel.layout import parallelize
from raytrain.rlhf.actors import ActorPools, rollout_pieces
from raytrain.rlhf.experience import (
    grpo_advantages,
    pack,
    ppo_advantages,
    response_logp,
    rollout_tensors,
    sequence_kl,
)
from raytrain.rlhf.objective import PolicyAndValue, PolicyObjective
from raytrain.rlhf.ppo_math import AdaptiveKLController
from raytrain.train.checkpoint import load_weights
from raytrain.train.loop import Worker, all_reduce_sum
from raytrain.train.metrics import StepLog
from raytrain.train.optim import build_optimizer

log = logging.getLogger("raytrain")
PROMPTS_FILE = "prompts.json"  # written by the driver: token ids of the prompts and what the run starts from
SAMPLES_FILE = "samples.jsonl"
ACTOR_FAILED_MARKER = ".debug_{}_actor_failed_once"
SAMPLE_COLUMNS = ["step", "split", "prompt", "response", "reward", "kl"]


def ppo_worker(loop_config: dict) -> None:
    config = config_from_dict(loop_config["config"])
    PPOWorker(config, loop_config["run_dir"], ActorPools(**loop_config["pools"])).run()


class PPOWorker(Worker):
    def __init__(self, config, run_dir: str, pools: ActorPools):
        super().__init__(config, run_dir)
        ppo = config.ppo
        kl_coef = self.resumed.get("ppo", {}).get("kl_coef", ppo.kl_coef)
        self.kl = AdaptiveKLController(kl_coef, ppo.kl_target, ppo.kl_horizon)
        self.session = uuid.uuid4().hex[:8]  # weights of another attempt never count as current
        self.synced: tuple | None = None
        if self.rank == 0:
            self.rollout, self.rewards = pools.handles("rollout"), pools.handles("reward")
            self.tokenizer = load_tokenizer(self.spec["tokenizer"]["path"])
            self.samples = StepLog(run_dir, SAMPLES_FILE, self.log.local_dir, self.start_step)

    # -- the stage's data, model and checkpoint contents --------------------------------------------------

    def _open_data(self) -> None:
        ppo = self.config.ppo
        self.spec = json.loads(storage.read_text(storage.join(self.run_dir, PROMPTS_FILE)))
        self.seq_len = self.spec["length"]
        self.order = BatchOrder(len(self.spec["train"]), ppo.prompts_per_iteration, self.train.seed)
        self.local_batch = self.train.global_batch // self.layout.dp
        self.updates = ppo.epochs * ppo.minibatches
        self.objective = PolicyObjective(ppo)
        self.has_val = bool(self.spec["val"]) and ppo.val_prompts > 0

    def _flops_per_token(self) -> float:
        value = train_flops_per_token(self.config.model, self.seq_len, "score") if self._critic else 0.0
        return train_flops_per_token(self.config.model, self.seq_len, "lm") + value

    @property
    def _critic(self) -> bool:
        return self.config.ppo.algorithm == "ppo"

    def _build_model(self) -> None:
        def built(head: str, seed: int) -> Transformer:
            model = Transformer(self.config.model, head=head)
            model.init_weights(seed)
            return model.to(self.device)

        policy = built("lm", self.train.seed)
        value = built("score", self.train.seed + 1) if self._critic else None
        self.parts = [PolicyAndValue(policy, value)]
        wrap = [parallelize(m, self.config.parallel, self.layout, self.device, self.bf16) if m is not None else None
                for m in (policy, value)]
        self.modules = [PolicyAndValue(*wrap)]
        self.optimizers = [build_optimizer(self.parts[0], self.train)]
        self.last_stage, self.schedule, self.loss_scale = True, None, 1.0

    def _start_fresh(self) -> None:
        """A new run: the policy from --policy, the value model from the reward model."""
        (module,) = self.modules
        load_weights(self.spec["policy"], module.policy)
        if module.value is not None:
            load_weights(self.spec["value_init"], module.value)

    def _checkpoint_meta(self, step: int) -> dict:
        return {
            "step": step,
            "model": vars(self.config.model),
            "objective": self.config.ppo.algorithm,
            "mask_fraction": self.spec["mask_fraction"],
            "tokens_seen": step * self.tokens_per_step,
            "data": self.config.ppo.prompts,
            "tokenizer": self.spec["tokenizer"],
            "seed": self.train.seed,
            "world_size": self.world,
            "ppo": {"iteration": step // self.updates, "kl_coef": self.kl.value, "policy": self.spec["policy"]},
        }

    # -- the iteration ------------------------------------------------------------------------------------

    def run(self) -> None:
        ppo = self.config.ppo
        started = time.perf_counter()
        first = self.start_step // self.updates
        if first == 0 and self.has_val:
            self._log(0, self._validate_reward(0))
        for iteration in range(first, ppo.iterations):
            step = iteration * self.updates
            tick = time.perf_counter()
            sync_s = self._sync_weights(step)
            batch = self._rollout(iteration)
            rollout_s = time.perf_counter() - tick - sync_s
            experience, stats, kl = self._experience(batch)
            update_tick = time.perf_counter()
            interval = self._update(step, iteration, experience)
            update_s = time.perf_counter() - update_tick
            done, last = iteration + 1, iteration + 1 == ppo.iterations
            metrics = {
                **self._interval_metrics(step + self.updates - 1, interval,
                                         {"compute": update_s, "data": rollout_s, "steps": self.updates}),
                **stats,
                "ppo/kl_coef": self.kl.value,
                "ppo/weight_sync_s": sync_s,
                "perf/rollout_tokens_per_s": stats["ppo/response_len"] * len(kl) / max(batch["generate_s"], 1e-9),
            }
            metrics["perf/iteration_s"] = time.perf_counter() - tick
            metrics["perf/rollout_time_frac"] = rollout_s / metrics["perf/iteration_s"]
            if ppo.kl_target > 0:  # the next iteration's β
                self.kl.update(stats["ppo/kl"], len(kl))
            if done % self.train.log_every == 0 or last:
                self._write_samples(step + self.updates, "train", batch, kl)
                if self.has_val and (last or (self.train.val_every and done % self.train.val_every == 0)):
                    metrics.update(self._validate_reward(step + self.updates))
                self._log(step + self.updates, metrics, started)
            if done % self.train.checkpoint_every == 0 or last:
                self._checkpoint(step + self.updates, metrics)
        # The rollout actors end holding the final policy (the driver checks they match the checkpoint).
        self._sync_weights(ppo.iterations * self.updates)
        if self.log is not None:
            self.log.close()

    def _sync_weights(self, step: int) -> float:
        """Gather the whole policy from its shards (every rank takes part) and load it into every rollout
        actor; returns the seconds it took. Skipped when the actors already hold this step's weights."""
        version = (self.session, step)
        if version == self.synced:
            return 0.0
        tick = time.perf_counter()
        (module,) = self.modules
        # Gathered whole to rank 0's CPU; a single CPU worker's parameters are already that (ray.put copies them).
        offload = self.world > 1 or self.device.type != "cpu"
        state = get_model_state_dict(module.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
        if self.rank == 0:
            self.weights = ray.put(state)
            ray.get([actor.load.remote(version, [self.weights]) for actor in self.rollout])
        self.synced = version
        return time.perf_counter() - tick

    def _rollout(self, iteration: int) -> dict:
        """The iteration's samples, scored, on every rank: G samples of each of its prompts."""
        batch = None
        if self.rank == 0:
            group = self.config.ppo.samples_per_prompt
            prompts = [self.spec["train"][int(i)] for i in self.order.consumer_rows(iteration) for _ in range(group)]
            seeds = [(self.train.seed * 1_000_003 + iteration * 10_007 + k) % 2**63 for k in range(len(prompts))]
            fail = iteration == self.config.debug.fail_actor_at_iteration
            batch = self._generate_and_score(prompts, seeds, self.config.ppo.temperature, fail)
        return self._broadcast(batch)

    def _generate_and_score(self, prompts: list[list[int]], seeds: list[int], temperature: float,
                            fail: bool = False) -> dict:
        """Rank 0: the rollout actors generate the samples in pieces; a reward actor scores each piece as soon as
        it exists (the responses pass between them as an object ref)."""
        ppo, special = self.config.ppo, self.spec["special"]
        settings = {"max_new_tokens": ppo.max_new_tokens, "eos_id": special["eos"], "pad_id": special["pad"],
                    "temperature": temperature, "top_k": ppo.top_k, "top_p": ppo.top_p}
        tick = time.perf_counter()
        generated, scored = [], []
        for i, (start, end) in enumerate(rollout_pieces(len(prompts), len(self.rollout), ppo.rollout_batch)):
            fails = fail and i == 0
            responses = self.rollout[i % len(self.rollout)].generate.remote(
                self.synced, [self.weights], prompts[start:end], seeds[start:end], settings,
                self._marker("rollout") if fails else None)
            generated.append(responses)
            scored.append(self.rewards[i % len(self.rewards)].score.remote(
                prompts[start:end], responses, self._marker("reward") if fails else None))
        responses = [r for part in ray.get(generated) for r in part]
        generate_s = time.perf_counter() - tick
        results = ray.get(scored)
        return {"prompts": prompts, "responses": responses, "generate_s": generate_s,
                "scores": [s for part, _ in results for s in part],
                "ref_logps": [lp for _, part in results for lp in part]}

    def _marker(self, pool: str) -> str:
        return storage.join(self.run_dir, ACTOR_FAILED_MARKER.format(pool))

    def _experience(self, batch: dict) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """Packed rows with advantages (the same on every rank), the batch's statistics and its sequence KLs."""
        ppo = self.config.ppo
        tokens, mask, ref = rollout_tensors(batch["prompts"], batch["responses"], batch["ref_logps"], self.seq_len,
                                            self.spec["special"]["pad"])
        old_logp, values = self._logp_values(tokens)
        scores = torch.tensor(batch["scores"])
        if self._critic:
            advantages, returns = ppo_advantages(scores, old_logp, ref, values, mask, self.kl.value, ppo.score_clip,
                                                 ppo.gamma, ppo.lam)
        else:
            advantages, returns, values = grpo_advantages(scores, ppo.samples_per_prompt, mask), mask * 0, mask * 0
        kl = sequence_kl(old_logp, ref, mask)
        stats = {"ppo/reward_mean": float(scores.mean()), "ppo/reward_std": float(scores.std(correction=0)),
                 "ppo/kl": float(kl.mean()), "ppo/response_len": float(mask.sum(1).mean())}
        rows = pack(tokens, mask=mask, old_logp=old_logp, ref_logp=ref, advantages=advantages, returns=returns,
                    old_values=values)
        return rows, stats, kl

    def _logp_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The current policy's log-probs and the value model's values of every row (zeros without a critic):
        each data-parallel rank computes its slice, then all ranks share them."""
        rows = len(tokens) // self.layout.dp
        mine = slice(self.layout.dp_rank * rows, (self.layout.dp_rank + 1) * rows)
        local = tokens[mine].to(self.device)
        (module,) = self.modules
        module.eval()
        with torch.no_grad(), self.compute():
            logits, values = module(local)
        module.train()
        shares = torch.zeros((2, len(tokens), tokens.shape[1] - 1), dtype=torch.float64, device=self.device)
        shares[0, mine] = response_logp(logits, local).double()
        if values is not None:
            shares[1, mine] = values[:, :-1].double()
        shares = all_reduce_sum(shares) / self.layout.tp
        return shares[0].float().cpu(), shares[1].float().cpu()

    def _update(self, step: int, iteration: int, experience: torch.Tensor) -> torch.Tensor:
        """epochs × minibatches optimizer steps; each minibatch a fixed shuffle's slice, split over dp ranks."""
        ppo, sums = self.config.ppo, None
        for epoch in range(ppo.epochs):
            generator = torch.Generator().manual_seed(self.train.seed * 1_000_003 + iteration * 1_009 + epoch)
            order = torch.randperm(len(experience), generator=generator)
            for minibatch in order.split(self.train.global_batch):
                mine = minibatch[self.layout.dp_rank * self.local_batch:(self.layout.dp_rank + 1) * self.local_batch]
                self._debug_hooks(step)
                self.objective.kl_coef = self.kl.value
                result = self._train_step(step, experience[mine].to(self.device))
                sums = result if sums is None else sums + result
                step += 1
        return sums

    # -- held-out reward and samples ----------------------------------------------------------------------

    def _validate_reward(self, step: int) -> dict[str, float]:
        """Greedy responses to the held-out prompts from the current policy: their mean reward and length. (Their
        log-ratio to the reference is no KL estimate, greedy tokens not being samples: ppo/kl is the KL.)"""
        self._sync_weights(step)
        batch = None
        if self.rank == 0:
            prompts = self.spec["val"][: self.config.ppo.val_prompts]
            batch = self._generate_and_score(prompts, [0] * len(prompts), temperature=0.0)
        batch = self._broadcast(batch)
        _, mask, _ = rollout_tensors(batch["prompts"], batch["responses"], batch["ref_logps"], self.seq_len,
                                     self.spec["special"]["pad"])
        self._write_samples(step, "val", batch)
        return {"val/reward_mean": float(torch.tensor(batch["scores"]).mean()),
                "val/response_len": float(mask.sum(1).mean())}

    def _write_samples(self, step: int, split: str, batch: dict, kl: torch.Tensor | None = None) -> None:
        """The first few (prompt, response, reward, KL) to samples.jsonl and a W&B table: reward hacking and
        length blow-up show in them."""
        if self.rank != 0 or self.config.ppo.samples_logged == 0:
            return
        count = min(self.config.ppo.samples_logged, len(batch["prompts"]))
        decode = self.tokenizer.decode_batch
        prompts = decode(batch["prompts"][:count], skip_special_tokens=True)
        responses = decode(batch["responses"][:count], skip_special_tokens=True)
        rows = [[step, split, p, r, float(batch["scores"][i]), float(kl[i]) if kl is not None else None]
                for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]
        self.samples.append([dict(zip(SAMPLE_COLUMNS, row, strict=True)) for row in rows])
        if self.log is not None and self.log.wandb is not None:
            import wandb

            self.log.wandb.log({f"{split}/samples": wandb.Table(columns=SAMPLE_COLUMNS, data=rows)}, step=step)
