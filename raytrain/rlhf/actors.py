"""The rollout and reward actor pools: Ray actors beside the Train workers, created by the driver.

The driver creates the actors (an actor requested inside a Train worker can wait forever for CPUs the
workers hold) as named actors; the learner's rank 0 looks them up and drives them. A dead actor is restarted
by Ray and its call resubmitted (`max_restarts`, `max_task_retries`); since every call carries the weights'
version (a restarted rollout actor says it lost them, and the learner streams them again: weight_sync) and every
sample its own seed, a resubmitted call returns what the first would have.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import ray
import torch

from raytrain import storage
from raytrain.config import PPOConfig
from raytrain.errors import DataError
from raytrain.model.lora import is_adapter
from raytrain.rlhf.engines import ENGINES
from raytrain.rlhf.experience import response_logp, response_slices
from raytrain.rlhf.remote_reward import HTTP_REWARDS, RemoteReward
from raytrain.rlhf.weight_sync import Plan, SideGroup, SideSpec, adapted_layers, merge
from raytrain.train.checkpoint import load_model

NAMESPACE = "raytrain"
PYTHON_REWARD = "python:"
# A receive stuck in a group an actor left (its peer gone) times out on its own thread while the next one runs.
SYNC_THREADS = {"sync": 4}


def import_reward(spec: str):
    """The function named by `python:module:function`, or a DataError saying what is wrong. A module in the
    working folder (a user's my_reward.py beside the command) is found there, as `python -m` would find it, and
    travels to the actors with the function: the cluster's nodes need not have it."""
    module_name, _, name = spec.removeprefix(PYTHON_REWARD).partition(":")
    if not module_name or not name:
        raise DataError(f"reward '{spec}' must look like python:module:function")
    here = os.getcwd()
    top = module_name.partition(".")[0]
    if here not in sys.path and (os.path.exists(os.path.join(here, top + ".py")) or os.path.isdir(os.path.join(
            here, top))):
        sys.path.append(here)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DataError(f"reward '{spec}': cannot import module '{module_name}' ({exc}); run from the folder that "
                        "holds it, or put it on PYTHONPATH") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise DataError(f"reward '{spec}': module '{module_name}' has no function '{name}'")
    if os.path.abspath(getattr(module, "__file__", None) or "/").startswith(here + os.sep):
        ray.cloudpickle.register_pickle_by_value(module)
    return function


def reward_function(spec: str):
    """The function a `python:` or `http(s)://` reward names (checked), or None for a reward model."""
    if spec.startswith(PYTHON_REWARD):
        return import_reward(spec)
    if spec.startswith(HTTP_REWARDS):
        return RemoteReward(spec)
    return None


def call_reward(function, spec: str, prompts: list[str], responses: list[str]) -> list[float]:
    """function(prompts, responses), checked: one finite number per response."""
    scores = function(prompts, responses)
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise DataError(f"reward '{spec}' returned {type(scores).__name__}; it must return a list of numbers, "
                        "one per response") from None
    if len(scores) != len(responses):
        raise DataError(f"reward '{spec}' returned {len(scores)} scores for {len(responses)} responses; return "
                        "one per response")
    if not all(math.isfinite(s) for s in scores):
        raise DataError(f"reward '{spec}' returned a non-finite score; return finite numbers")
    return scores


def actor_device() -> torch.device:
    """The GPU Ray gave this actor (ppo.actor_gpus > 0), else the CPU."""
    return torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")


def exit_once(marker: str | None) -> None:
    """debug.fail_actor_at_iteration: the actor's process exits mid-call, once (the marker file remembers)."""
    if marker is not None and not storage.exists(marker):
        storage.write_text(marker, "")
        os._exit(1)


def right_padded(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    longest = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (longest - len(r)) for r in rows], dtype=torch.long)


def rollout_settings(ppo: PPOConfig, special: dict, temperature: float) -> dict:
    """What a rollout engine generates with (RolloutEngine.generate's settings)."""
    return {"max_new_tokens": ppo.max_new_tokens, "stop_ids": tuple(special["stop"]), "pad_id": special["pad"],
            "temperature": temperature, "top_k": ppo.top_k, "top_p": ppo.top_p}


class StaleWeights(Exception):
    """A rollout actor asked for weights it does not hold (restarted by Ray since the last sync)."""


@ray.remote(concurrency_groups=SYNC_THREADS)
class RolloutActor:
    """Generates responses with a rollout engine (rlhf/engines/) from the policy weights last streamed to it
    (weight_sync)."""

    def __init__(self, model: dict, threads: int, engine: str = "native"):
        torch.set_num_threads(threads)
        self.engine = ENGINES[engine](model, actor_device())
        self.version: tuple | None = None
        self.side: SideGroup | None = None
        self.bases: dict[str, torch.Tensor] = {}  # ppo.lora_sync=adapters: the adapted layers' base weights

    def side_group(self) -> str | None:
        """The side group this actor is in (none after a restart)."""
        return self.side.spec.prefix if self.side is not None else None

    @ray.method(concurrency_group="sync")
    def receive(self, spec: SideSpec, rank: int, plan: Plan, version: tuple, fail_marker: str | None = None,
                lora_scaling: float | None = None) -> None:
        """Take the weights `version` bucket by bucket from the learner (joining its group first if new). With
        lora_scaling (ppo.lora_sync=adapters) the adapted layers' base weights, when sent, are kept, and each
        adapted layer becomes its base with its update merged, as the learner merges it."""
        self.version = None  # half-received weights are no version
        if self.side is None or self.side.spec != spec:
            self.side = SideGroup(spec, rank)
        adapted = adapted_layers(name for bucket in plan for name, _, _ in bucket) if lora_scaling else []
        self._take(self.side.receive(plan), version, fail_marker, adapted, lora_scaling)

    def load(self, version: tuple, weights: list, fail_marker: str | None = None) -> None:
        """Take the weights `version` from the object store ([ObjectRef]: a small policy's way)."""
        self.version = None
        self._take(ray.get(weights[0]).items(), version, fail_marker)

    def _take(self, tensors: Iterable[tuple[str, torch.Tensor]], version: tuple, fail_marker: str | None,
              adapted: list[str] = (), lora_scaling: float | None = None) -> None:
        parameters, bases, adapters = self.engine.parameters(), {f"{layer}.weight" for layer in adapted}, {}
        with torch.no_grad():
            for name, tensor in tensors:
                if is_adapter(name):
                    adapters[name] = tensor.clone()  # (a view of the bucket, which the next one overwrites)
                elif name in bases:
                    self.bases[name] = tensor.clone()
                else:
                    parameters[name].copy_(tensor)
                exit_once(fail_marker)
            missing = [layer for layer in adapted if f"{layer}.weight" not in self.bases]
            if missing:  # (every bucket taken first: the group stays in step for the next sync)
                raise StaleWeights(f"holds no base weights of {missing[0]} to merge its adapters into")
            for layer in adapted:
                parameters[f"{layer}.weight"].copy_(merge(self.bases[f"{layer}.weight"],
                                                          adapters[f"{layer}.lora_A.weight"],
                                                          adapters[f"{layer}.lora_B.weight"], lora_scaling))
        self.engine.loaded()
        self.version = version

    @ray.method(num_returns=2)
    def generate(self, version: tuple, prompts: list[list[int]], seeds: list[int], settings: dict,
                 fail_marker: str | None = None) -> tuple[list[list[int]], tuple[list[list[float]], float]]:
        """(responses to prompts from the weights `version`, (each token's log-probability under the engine, the
        seconds it took)); StaleWeights when this actor lost them."""
        if version != self.version:
            raise StaleWeights(f"holds weights {self.version}, asked for {version}")
        exit_once(fail_marker)
        tick = time.perf_counter()
        responses, logprobs = self.engine.generate(prompts, seeds, settings)
        return responses, (logprobs, time.perf_counter() - tick)

    def weights(self) -> tuple[tuple | None, dict]:
        return self.version, self.engine.state_dict()


class RewardActor:
    """Scores (prompt, response) with a reward model or a Python function, and gives the frozen reference
    model's log-probabilities of each response token."""

    def __init__(self, reward: str, function, reference: str, tokenizer: str, threads: int, pad_id: int):
        """function: the Python reward the driver imported (sent by value when the nodes may lack its module)
        or the HTTP one, or None for a reward model at `reward`."""
        torch.set_num_threads(threads)
        self.spec, self.pad_id, self.device = reward, pad_id, actor_device()
        self.reference, _ = load_model(reference, self.device)
        if function is not None:
            from raytrain.data.tokenizer import load_tokenizer

            self.function, self.tokenizer = function, load_tokenizer(tokenizer)
        else:
            self.model, meta = load_model(reward, self.device)
            self.mean, self.std = meta["reward"]["mean"], max(meta["reward"]["std"], 1e-6)

    @torch.inference_mode()
    def score(self, prompts: list[list[int]], responses: list[list[int]],
              fail_marker: str | None = None) -> tuple[list[float], list[list[float]]]:
        """(scores, reference log-probs per response token); a model's scores normalised by its stored
        statistics, read at each response's last token."""
        exit_once(fail_marker)
        tokens = right_padded([p + r for p, r in zip(prompts, responses, strict=True)], self.pad_id).to(self.device)
        ref = response_slices(response_logp(self.reference(tokens), tokens), prompts, responses)
        if hasattr(self, "function"):
            texts = self.tokenizer.decode_batch(prompts, skip_special_tokens=True)
            replies = self.tokenizer.decode_batch(responses, skip_special_tokens=True)
            return call_reward(self.function, self.spec, texts, replies), ref
        last = torch.tensor([len(p) + len(r) - 1 for p, r in zip(prompts, responses, strict=True)], device=self.device)
        raw = self.model(tokens)[torch.arange(len(tokens), device=self.device), last, 0]
        return ((raw - self.mean) / self.std).tolist(), ref


def rollout_pieces(count: int, actors: int, batch: int) -> list[tuple[int, int]]:
    """[start, end) of the generate calls for `count` samples: pieces of at most `batch` (0: one piece per
    actor), near-equal, in order. Piece k goes to actor k % actors, so each actor generates its pieces in turn
    while the reward actors score the finished ones."""
    pieces = max(actors, -(-count // batch)) if batch else actors
    bounds = [count * i // pieces for i in range(pieces + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


@dataclass(frozen=True)
class ActorPools:
    """Names of a run's actors; `handles` looks them up from any process of the cluster (the workers get
    the names, the creating driver also holds the handles)."""

    rollout: list[str]
    reward: list[str]
    owned: list = field(default_factory=list, compare=False, repr=False)  # the creator's handles

    @staticmethod
    def create(ppo: PPOConfig, model: dict, reward: str, reference: str, tokenizer: str, pad_id: int) -> ActorPools:
        tag = uuid.uuid4().hex[:8]
        threads = max(1, int(ppo.actor_cpus))
        options = {"num_cpus": ppo.actor_cpus, "num_gpus": ppo.actor_gpus, "namespace": NAMESPACE,
                   "max_restarts": ppo.actor_restarts, "max_task_retries": ppo.actor_restarts}
        pools = ActorPools([f"rollout-{tag}-{i}" for i in range(ppo.rollout_actors)],
                           [f"reward-{tag}-{i}" for i in range(ppo.reward_actors)])
        # The driver keeps the handles: an actor lives while a handle of its creator does.
        pools.owned.extend(RolloutActor.options(name=name, **options).remote(model, threads, ppo.rollout_engine)
                           for name in pools.rollout)
        function = reward_function(reward)
        pools.owned.extend(ray.remote(RewardActor).options(name=name, **options)
                           .remote(reward, function, reference, tokenizer, threads, pad_id) for name in pools.reward)
        # Fail here, with the actor's own error, if one cannot start (a reward that does not load).
        ray.get([actor.__ray_ready__.remote() for actor in pools.owned])
        return pools

    def handles(self, kind: str) -> list:
        return [ray.get_actor(name, namespace=NAMESPACE) for name in getattr(self, kind)]

    def kill(self) -> None:
        for actor in self.owned:
            ray.kill(actor, no_restart=True)
        self.owned.clear()
