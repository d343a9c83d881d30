"""PPO's and GRPO's batch source for the one loop: each round, experience made by the rollout and reward pools.

Per round (an iteration): stream the policy's weights to the rollout actors (each tensor gathered whole from the
FSDP/TP shards, in buckets, versioned: weight_sync); rank 0 has the rollout pool generate responses to the
iteration's prompts and the reward pool score them and give the reference log-probs (responses go from rollout
to reward actor as object refs);
every rank gets the batch, computes the old log-probs and values on its data-parallel slice, and the same
advantages from the whole batch; then `epochs` × `minibatches` steps, each a minibatch of the experience.
Prompt order, sampling seeds and minibatch order are functions of (seed, iteration), so a resumed run, or one
with more actors, sees the same batches; the adaptive KL coefficient is the source's state in the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterator

import ray
import torch

from raytrain import storage
from raytrain.data.stream import BatchOrder
from raytrain.data.tokenizer import load_tokenizer
from raytrain.errors import DataError
from raytrain.model.flops import train_flops_per_token
from raytrain.rlhf.actors import StaleWeights, rollout_pieces, rollout_settings
from raytrain.rlhf.algorithms import ALGORITHMS
from raytrain.rlhf.algorithms.base import Rollout
from raytrain.rlhf.experience import Experience, on_grid, response_logp, rollout_tensors, sequence_kl
from raytrain.rlhf.health import MONITORS, HealthMonitors
from raytrain.rlhf.objective import PolicyObjective
from raytrain.rlhf.ppo_math import (
    AdaptiveKLController,
    overlong_penalty,
    truncated_importance_weights,
    varied_groups,
)
from raytrain.rlhf.weight_sync import WeightSender
from raytrain.train.loop import all_reduce_sum
from raytrain.train.metrics import StepLog

log = logging.getLogger("raytrain")

PROMPTS_FILE = "prompts.json"  # written by the stage: token ids of the prompts and what the run starts from
SAMPLES_FILE = "samples.jsonl"
ACTOR_FAILED_MARKER = ".debug_{}_actor_failed_once"  # rollout-sync, rollout, reward
SAMPLE_COLUMNS = ["step", "split", "prompt", "response", "reward", "kl", "policy_step"]
# What the source logs beside the objective's metrics.
EXPERIENCE_METRICS = ("ppo/reward_mean", "ppo/reward_std", "ppo/kl", "ppo/kl_coef", "ppo/response_len",
                      "ppo/equal_reward_groups", "ppo/logprob_mismatch", "ppo/logprob_mismatch_max",
                      "ppo/staleness", "ppo/regenerated_rollouts",
                      "ppo/weight_sync_s", "ppo/weight_sync_peak_gib", "perf/rollout_tokens_per_s",
                      "perf/rollout_time_frac", "perf/iteration_s",
                      "val/reward_mean", "val/accuracy", "val/response_len",
                      *(f"health/{name}" for name in MONITORS))


class ExperienceSource:
    def __init__(self, worker):
        self.worker = worker
        self.ppo = ppo = worker.config.ppo
        self.spec = json.loads(storage.read_text(storage.join(worker.run_dir, PROMPTS_FILE)))
        self.seq_len = self.spec["length"]
        self.order = BatchOrder(len(self.spec["train"]), ppo.prompts_per_iteration, worker.train.seed)
        self.local_batch = worker.train.global_batch // worker.layout.dp
        self.steps_per_round = ppo.epochs * ppo.minibatches
        self.rounds = ppo.iterations
        self.objective = PolicyObjective(ppo)
        self.algorithm = ALGORITHMS[ppo.algorithm]
        self.has_val = bool(self.spec["val"]) and ppo.val_prompts > 0
        self.kl = AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
        self.health = HealthMonitors(ppo.health)
        self.pending: dict[int, dict] = {}  # async: iteration → its rollout's calls in flight
        self.ready: dict[int, dict | None] = {}  # async: iteration → its rollout, done (None: lost with an actor)
        self.regenerated = 0  # async rollouts lost with an actor and made again from newer weights
        self.fired: set[str] = set()  # monitors fired since the last logged iteration
        self.stopped_by, self.stop_reason = "", ""  # a monitor of ppo.stop_on fired: the loop ends the run
        self.iterations_done = 0
        self.session = uuid.uuid4().hex[:8]  # weights of another attempt never count as current
        self.synced: tuple | None = None
        self.round_stats: dict[str, float] = {}
        self.rollout = []
        if worker.rank == 0:
            pools = worker.extras["pools"]
            self.rollout, self.rewards = pools.handles("rollout"), pools.handles("reward")
            self.tokenizer = load_tokenizer(self.spec["tokenizer"]["path"])
        self.sender: WeightSender | None = None  # once the policy is built
        self.samples: StepLog | None = None  # opened once the worker knows its start step (after a resume)

    def flops_per_token(self) -> float:
        model = self.worker.config.model
        value = train_flops_per_token(model, self.seq_len, "score") if self.algorithm.critic else 0.0
        return train_flops_per_token(model, self.seq_len, "lm") + value

    # -- what a checkpoint holds ----------------------------------------------------------------------------

    def state(self) -> dict:
        """What a resumed run needs beside its step: the iterations done (the prompt position: iteration i takes
        the BatchOrder's batch i), β for the next one, the health monitors' baselines and (async) the rollouts
        already asked of older weights, waited for here. Structures go as JSON text: a checkpoint's leaves have
        fixed shapes."""
        self._wait_for_pending()
        return {"iterations_done": self.iterations_done, "kl_coef": self.kl.value,
                "health": json.dumps(self.health.state()), "stop": json.dumps([self.stopped_by, self.stop_reason]),
                "regenerated": self.regenerated,
                "rollouts": json.dumps({str(iteration): batch for iteration, batch in self.ready.items()})}

    def load_state(self, state: dict) -> None:
        self.iterations_done, self.kl.value = int(state["iterations_done"]), float(state["kl_coef"])
        self.health.load_state(json.loads(state["health"]))
        stopped_by, reason = json.loads(state["stop"])
        if stopped_by in self.ppo.stop_on:  # a run resumed after its stop stays stopped, unless told to go on
            self.stopped_by, self.stop_reason = stopped_by, reason
        self.regenerated = int(state["regenerated"])
        self.ready = {int(iteration): batch for iteration, batch in json.loads(state["rollouts"]).items()}

    def checkpoint_meta(self) -> dict:
        return {"mask_fraction": self.spec["mask_fraction"], "data": self.ppo.prompts,
                "tokenizer": self.spec["tokenizer"], "ppo": {"policy": self.spec["policy"]}}

    # -- the rounds -----------------------------------------------------------------------------------------

    def batches(self, start_step: int) -> Iterator[tuple[int, Experience]]:
        worker = self.worker
        if start_step != self.iterations_done * self.steps_per_round:
            raise RuntimeError(f"the checkpoint of step {start_step} holds the PPO state after iteration "
                               f"{self.iterations_done}; it was written by another ppo.epochs × ppo.minibatches")
        for iteration in range(self.iterations_done, self.rounds):
            step = iteration * self.steps_per_round
            tick = time.perf_counter()
            self.batch, sync_s = self._batch_for(iteration, step)
            rollout_s = time.perf_counter() - tick - sync_s  # what the learner waited for (async: what was left)
            experience, stats, self.kls = self._experience(self.batch)
            self.objective.kl_coef = self.kl.value
            self.round_stats = {**stats, "ppo/kl_coef": self.kl.value, "ppo/weight_sync_s": sync_s,
                                # No sender yet: a resumed asynchronous run whose first iteration had its rollout.
                                "ppo/weight_sync_peak_gib": self.sender.peak_bytes / 2**30 if self.sender else 0.0,
                                "ppo/staleness": (step - self.batch["version"]) / self.steps_per_round,
                                "ppo/regenerated_rollouts": float(self.regenerated),
                                "perf/rollout_tokens_per_s": stats["ppo/response_len"] * len(self.kls)
                                / max(self.batch["generate_s"], 1e-9)}
            self.round_started, self.rollout_s = tick, rollout_s
            for epoch in range(self.ppo.epochs):
                generator = torch.Generator().manual_seed(worker.train.seed * 1_000_003 + iteration * 1_009 + epoch)
                order = torch.randperm(len(experience), generator=generator)
                for minibatch in order.split(worker.train.global_batch):
                    rank = worker.layout.dp_rank
                    mine = minibatch[rank * self.local_batch:(rank + 1) * self.local_batch]
                    yield step, experience[mine].to(worker.device)
                    step += 1

    def round_metrics(self, round_: int, trained) -> dict[str, float]:
        """The iteration's rollout statistics, timing and health (trained(): the loss's metrics of its steps);
        then β for the next iteration."""
        metrics = dict(self.round_stats)
        metrics["perf/iteration_s"] = time.perf_counter() - self.round_started
        metrics["perf/rollout_time_frac"] = self.rollout_s / metrics["perf/iteration_s"]
        if self.ppo.kl_target > 0:
            self.kl.update(metrics["ppo/kl"], len(self.kls))
        self.iterations_done = round_ + 1
        self._raise(self.health.iteration({**metrics, **trained()}, self.batch["responses"],
                                          self.ppo.samples_per_prompt))
        metrics.update({f"health/{name}": float(name in self.fired) for name in MONITORS
                        if name != "reward_divergence"})  # that one is validate's
        return metrics

    def on_log(self, step: int) -> None:
        self._write_samples(step, "train", self.batch, self.kls)
        self.fired.clear()

    def _raise(self, fired: dict[str, str]) -> None:
        """Monitors that fired: remembered for the metrics, a warning and a W&B alert on rank 0, and the reason to
        stop when ppo.stop_on names one (every rank decides alike: the numbers are the same on each)."""
        worker, iteration = self.worker, self.iterations_done
        for name, why in fired.items():
            self.fired.add(name)
            stops = name in self.ppo.stop_on
            if stops and not self.stop_reason:
                self.stopped_by, self.stop_reason = name, f"{name} after {iteration} iterations: {why}"
            if worker.rank != 0:
                continue
            log.warning("%s health: %s after %d iterations: %s%s", worker.tag, name, iteration, why,
                        " — stopping (ppo.stop_on)" if stops else "")
            if worker.log is not None and worker.log.wandb is not None:
                import wandb

                worker.log.wandb.alert(title=f"{worker.config.run.name}: {name}", level=wandb.AlertLevel.WARN,
                                       text=f"after {iteration} iterations: {why}", wait_duration=0)

    def finish(self, step: int) -> None:
        """The rollout actors end holding the final policy (the stage checks they match the checkpoint)."""
        self._sync_weights(step)

    def _sync_weights(self, step: int, fail_marker: str | None = None) -> float:
        """Stream the policy into every rollout actor (every rank takes part); returns the seconds it took.
        Skipped when the actors already hold this step's weights; rollouts still in flight finish first (they
        were asked of the weights the actors hold)."""
        worker = self.worker
        version = (self.session, step)
        if version == self.synced:
            return 0.0
        self._wait_for_pending()
        tick = time.perf_counter()
        if self.sender is None:
            (module,) = worker.modules
            self.sender = WeightSender(module.policy, worker.rank, self.rollout,
                                       bucket_bytes=int(self.ppo.sync_bucket_mb * 2**20),
                                       timeout_s=self.ppo.sync_timeout_s, restarts=self.ppo.actor_restarts,
                                       nccl=worker.device.type == "cuda" and self.ppo.actor_gpus > 0,
                                       agree=worker.broadcast, streamed=self.ppo.weight_sync == "stream",
                                       adapters=self.ppo.lora_sync == "adapters")
        self.sender.sync(version, fail_marker)
        self.synced = version
        return time.perf_counter() - tick

    def _wait_for_pending(self) -> None:
        """Every rollout in flight, collected (a collective: every rank calls it)."""
        for iteration in sorted(self.pending):
            self.ready[iteration] = self._collect(self.pending.pop(iteration))

    def _batch_for(self, iteration: int, step: int) -> tuple[dict, float]:
        """The iteration's scored samples on every rank, and the seconds the weight sync took.

        Asynchronous (ppo.async_rollouts), every max_staleness iterations the actors take the current weights and
        start the rollouts of the next max_staleness iterations, which they generate while the learner trains: a
        rollout comes from weights at most max_staleness iterations old, on a schedule fixed by the iteration
        alone (so a resumed run, which finds the rollouts in flight in its checkpoint, repeats it). A rollout lost
        with an actor (restarted by Ray, its weights gone) is made again from the current weights and counted."""
        fails = iteration == self.worker.config.debug.fail_actor_at_iteration
        marker = self._marker("rollout-sync") if fails else None
        if not self.ppo.async_rollouts:
            sync_s = self._sync_weights(step, marker)
            return self._rollout(iteration, step), sync_s
        if iteration in self.pending:
            self.ready[iteration] = self._collect(self.pending.pop(iteration))
        batch = self.ready.pop(iteration, None)
        sync_s = 0.0
        if batch is None or iteration % self.ppo.max_staleness == 0:
            sync_s = self._sync_weights(step, marker)
        if batch is None:  # the first iteration, or its rollout was lost with an actor
            self.regenerated += iteration > 0
            batch = self._rollout(iteration, step)
        if iteration % self.ppo.max_staleness == 0:
            for later in range(iteration + 1, min(iteration + self.ppo.max_staleness, self.rounds - 1) + 1):
                self.pending[later] = self._launch(*self._rollout_inputs(later), self.ppo.temperature,
                                                   later == self.worker.config.debug.fail_actor_at_iteration)
        return batch, sync_s

    def _rollout_inputs(self, iteration: int) -> tuple[list[list[int]], list[int]]:
        """The iteration's prompts (G samples of each) and each sample's seed."""
        group, seed = self.ppo.samples_per_prompt, self.worker.train.seed
        prompts = [self.spec["train"][int(i)] for i in self.order.consumer_rows(iteration) for _ in range(group)]
        return prompts, [(seed * 1_000_003 + iteration * 10_007 + k) % 2**63 for k in range(len(prompts))]

    def _rollout(self, iteration: int, step: int) -> dict:
        """The iteration's samples, scored, on every rank, from the weights the actors hold."""
        fail = iteration == self.worker.config.debug.fail_actor_at_iteration
        return self._samples(step, *self._rollout_inputs(iteration), self.ppo.temperature, fail)

    def _samples(self, step: int, prompts: list[list[int]], seeds: list[int], temperature: float,
                 fail: bool = False) -> dict:
        """Generated and scored, on every rank. An actor restarted by Ray since the sync lost the weights: all
        ranks stream them again and rank 0 asks again (each sample's seed makes it the same)."""
        for _ in range(self.ppo.actor_restarts + 1):
            batch = self._collect(self._launch(prompts, seeds, temperature, fail))
            if batch is not None:
                return batch
            self.synced = None
            self._sync_weights(step)
        raise DataError(f"the rollout actors lost the policy's weights {self.ppo.actor_restarts + 1} times in a "
                        "row (restarted by Ray each time); see their logs for why they die")

    def _launch(self, prompts: list[list[int]], seeds: list[int], temperature: float, fail: bool = False) -> dict:
        """Rank 0 asks the rollout actors for the samples in pieces, and a reward actor to score each piece as
        soon as it exists (the responses pass between them as an object ref); returns the calls in flight (other
        ranks: what will be asked)."""
        ppo, special = self.ppo, self.spec["special"]
        calls = {"prompts": prompts, "version": self.synced[1], "generated": [], "scored": []}
        if self.worker.rank != 0:
            return calls
        settings = rollout_settings(ppo, special, temperature)
        for i, (start, end) in enumerate(rollout_pieces(len(prompts), len(self.rollout), ppo.rollout_batch)):
            fails = fail and i == 0
            responses, details = self.rollout[i % len(self.rollout)].generate.remote(
                self.synced, prompts[start:end], seeds[start:end], settings,
                self._marker("rollout") if fails else None)
            calls["generated"].append((i % len(self.rollout), responses, details))
            calls["scored"].append(self.rewards[i % len(self.rewards)].score.remote(
                prompts[start:end], responses, self._marker("reward") if fails else None))
        return calls

    def _collect(self, calls: dict) -> dict | None:
        """The launched calls' batch on every rank, or None when a rollout actor lost its weights (restarted by
        Ray). generate_s: the busiest actor's generation time."""
        batch = None
        if self.worker.rank == 0:
            with contextlib.suppress(StaleWeights):
                responses = [r for part in ray.get([g[1] for g in calls["generated"]]) for r in part]
                details = ray.get([g[2] for g in calls["generated"]])
                busy: dict[int, float] = {}
                for (actor, _, _), (_, seconds) in zip(calls["generated"], details, strict=True):
                    busy[actor] = busy.get(actor, 0.0) + seconds
                results = ray.get(calls["scored"])
                batch = {"prompts": calls["prompts"], "responses": responses, "version": calls["version"],
                         "generate_s": max(busy.values()),
                         "engine_logps": [lp for logps, _ in details for lp in logps],
                         "scores": [s for part, _ in results for s in part],
                         "ref_logps": [lp for _, part in results for lp in part]}
        return self.worker.broadcast(batch)

    def _marker(self, pool: str) -> str:
        return storage.join(self.worker.run_dir, ACTOR_FAILED_MARKER.format(pool))

    def _experience(self, batch: dict) -> tuple[Experience, dict[str, float], torch.Tensor]:
        """The batch as experience with advantages (the same on every rank), its statistics and its sequence KLs."""
        ppo = self.ppo
        tokens, mask, ref = rollout_tensors(batch["prompts"], batch["responses"], batch["ref_logps"], self.seq_len,
                                            self.spec["special"]["pad"])
        old_logp, values = self._logp_values(tokens)
        # The engine's log-probs of its own samples against the learner's (other kernels, or older weights).
        engine_logp = on_grid(batch["prompts"], batch["engine_logps"], self.seq_len)
        mismatch = (old_logp - engine_logp).abs() * mask
        raw = torch.tensor(batch["scores"])
        lengths = mask.sum(1)
        scores = raw + overlong_penalty(lengths, ppo.max_new_tokens, ppo.overlong_buffer) if ppo.overlong_buffer \
            else raw
        group = ppo.samples_per_prompt
        advantages, returns = self.algorithm.advantages(
            Rollout(scores, old_logp, ref, values, mask, group, self.kl.value), ppo)
        kl = sequence_kl(old_logp, ref, mask)
        stats = {"ppo/reward_mean": float(raw.mean()), "ppo/reward_std": float(raw.std(correction=0)),
                 "ppo/kl": float(kl.mean()), "ppo/response_len": float(lengths.mean()),
                 "ppo/logprob_mismatch": float(mismatch.sum() / mask.sum().clamp(min=1)),
                 "ppo/logprob_mismatch_max": float(mismatch.max())}
        if group > 1:
            varied = varied_groups(scores.view(-1, group))
            stats["ppo/equal_reward_groups"] = 1 - float(varied.double().mean())
            if self.algorithm.filters_groups:  # their rows leave the loss (and its token count)
                mask = mask * varied.repeat_interleave(group)[:, None]
                advantages = advantages * mask
        if not self.algorithm.critic:
            values = mask * 0
        tis = truncated_importance_weights(old_logp, engine_logp, mask, ppo.tis_cap)
        experience = Experience(tokens, mask=mask, old_logp=old_logp, ref_logp=ref, advantages=advantages,
                                returns=returns, old_values=values, tis=tis)
        return experience, stats, kl

    def _logp_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The current policy's log-probs and the value model's values of every row (zeros without a critic):
        each data-parallel rank computes its slice, then all ranks share them."""
        worker = self.worker
        rows = len(tokens) // worker.layout.dp
        mine = slice(worker.layout.dp_rank * rows, (worker.layout.dp_rank + 1) * rows)
        local = tokens[mine].to(worker.device)
        (module,) = worker.modules
        module.eval()
        with torch.no_grad(), worker.compute():
            logits, values = module(local)
        module.train()
        shares = torch.zeros((2, len(tokens), tokens.shape[1] - 1), dtype=torch.float64, device=worker.device)
        shares[0, mine] = response_logp(logits, local).double()
        if values is not None:
            shares[1, mine] = values[:, :-1].double()
        shares = all_reduce_sum(shares) / worker.layout.tp
        return shares[0].float().cpu(), shares[1].float().cpu()

    # -- held-out reward and samples ------------------------------------------------------------------------

    def validate(self, step: int) -> dict[str, float]:
        """Greedy responses to the held-out prompts from the current policy: their mean reward and length. (Their
        log-ratio to the reference is no KL estimate, greedy tokens not being samples: ppo/kl is the KL.)"""
        self._sync_weights(step)
        prompts = self.spec["val"][: self.ppo.val_prompts]
        batch = self._samples(step, prompts, [0] * len(prompts), temperature=0.0)
        _, mask, _ = rollout_tensors(batch["prompts"], batch["responses"], batch["ref_logps"], self.seq_len,
                                     self.spec["special"]["pad"])
        self._write_samples(step, "val", batch)
        held_out = float(torch.tensor(batch["scores"]).mean())
        metrics = {"val/reward_mean": held_out, "val/response_len": float(mask.sum(1).mean()),
                   **({"val/accuracy": held_out} if self.spec.get("verifier") else {})}  # (.get: runs begun before)
        if self.round_stats:  # after an iteration: is the held-out reward falling while the train reward rises?
            fired = self.health.validation(held_out, self.round_stats["ppo/reward_mean"])
            self._raise(fired)
            metrics["health/reward_divergence"] = float(bool(fired))
        return metrics

    def _write_samples(self, step: int, split: str, batch: dict, kl: torch.Tensor | None = None) -> None:
        """The first few (prompt, response, reward, KL) to samples.jsonl and a W&B table: reward hacking and
        length blow-up show in them."""
        worker = self.worker
        if worker.rank != 0 or self.ppo.samples_logged == 0:
            return
        if self.samples is None:
            self.samples = StepLog(worker.run_dir, SAMPLES_FILE, worker.log.local_dir, worker.start_step)
        count = min(self.ppo.samples_logged, len(batch["prompts"]))
        decode = self.tokenizer.decode_batch
        prompts = decode(batch["prompts"][:count], skip_special_tokens=True)
        responses = decode(batch["responses"][:count], skip_special_tokens=True)
        rows = [[step, split, p, r, float(batch["scores"][i]), float(kl[i]) if kl is not None else None,
                 batch["version"]]
                for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]
        self.samples.append([dict(zip(SAMPLE_COLUMNS, row, strict=True)) for row in rows])
        if worker.log is not None and worker.log.wandb is not None:
            import wandb

            worker.log.wandb.log({f"{split}/samples": wandb.Table(columns=SAMPLE_COLUMNS, data=rows)}, step=step)
