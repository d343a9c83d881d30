"""Streaming the policy from the learner to the rollout actors in buckets over a side process group.

The learner's rank 0 and the N rollout actors form their own group (gloo on CPU, NCCL when both sides hold GPUs)
beside Ray Train's: rank 0 serves a TCPStore, each actor joins it (FIELD-NOTES: `ray.util.collective` cannot build a
group inside a Train worker). A sync walks the parameters in a fixed order; every learner rank takes part in
gathering each whole tensor (an FSDP/TP `full_tensor()`), rank 0 copies them into a bucket of at most
`ppo.sync_bucket_mb` and broadcasts it, then frees it: the extra memory is one bucket and one tensor, not the model.
Every actor knows the plan (names, shapes, dtypes in order), so it unpacks each bucket into its own parameters as
it arrives, and holds the weights' version once the last bucket is in. `ppo.weight_sync=object_store` sends the
whole policy through Ray's object store instead (`ray.put` once, each actor fetches it): no port beyond Ray's
between learner and actors, but the whole model in memory and slower (BENCHMARKS.md). A LoRA policy goes merged,
or with `ppo.lora_sync=adapters` as its adapters alone once the actors hold its base (a whole sync first, and again
into a new group), each actor merging them as the learner would.

A gone actor fails the broadcast (its connection closes) or its receive call; then every learner rank finishes the
gathers it is in, they agree to try again, rank 0 waits for Ray to restart the actor and forms a new group with all
actors. The survivors' calls stuck in the old group time out on their own thread (the actors' `sync` concurrency
group), so they do not hold up the new one.
"""

from __future__ import annotations

import datetime
import functools
import math
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import _get_fqns
from torch.distributed.tensor import DTensor

from raytrain.errors import DataError
from raytrain.model.lora import LoRALinear, is_adapter
from raytrain.train.memory import TensorMemory

Plan = list[list[tuple[str, tuple[int, ...], torch.dtype]]]


def bucket_plan(shapes: list[tuple[str, tuple[int, ...], torch.dtype]], bucket_bytes: int) -> Plan:
    """The parameters cut, in order, into buckets of one dtype and at most bucket_bytes (a larger tensor alone in
    its own)."""
    buckets: Plan = [[]]
    size = 0
    for name, shape, dtype in shapes:
        nbytes = math.prod(shape) * dtype.itemsize
        if buckets[-1] and (size + nbytes > bucket_bytes or buckets[-1][-1][2] != dtype):
            buckets.append([])
            size = 0
        buckets[-1].append((name, shape, dtype))
        size += nbytes
    return [bucket for bucket in buckets if bucket]


@dataclass(frozen=True)
class SideSpec:
    """Where a side group meets: rank 0's store, the group's name in it, its size and backend."""

    host: str
    port: int
    prefix: str
    world: int
    backend: str  # "gloo" or "nccl"
    timeout_s: float


class SideGroup:
    """A process group of rank 0 (the sender) and the receivers, apart from any default group."""

    def __init__(self, spec: SideSpec, rank: int, store: dist.TCPStore | None = None):
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        self.store = store or dist.TCPStore(spec.host, spec.port, spec.world, is_master=False, timeout=timeout)
        prefixed = dist.PrefixStore(spec.prefix, self.store)
        if spec.backend == "nccl":
            self.group = dist.ProcessGroupNCCL(prefixed, rank, spec.world, timeout=timeout)
            self.device = torch.device("cuda")
        else:
            self.group = dist.ProcessGroupGloo(prefixed, rank, spec.world, timeout=timeout)
            self.device = torch.device("cpu")
        self.spec = spec

    def broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0  # (a bare int is a TypeError)
        try:
            self.group.broadcast([tensor], options).wait()
        except RuntimeError as error:
            raise DataError(f"weight sync: a broadcast of {tensor.numel() * tensor.element_size():,} bytes failed "
                            f"(or took over {self.spec.timeout_s:.0f} s, ppo.sync_timeout_s): {error}") from None

    def send(self, plan: Plan, tensors: Iterable[torch.Tensor]) -> None:
        """Rank 0: the tensors, in the plan's order, bucket by bucket."""
        stream, buffers = iter(tensors), {}
        for bucket in plan:
            flat = self._bucket(bucket, buffers)
            offset = 0
            for _, shape, _ in bucket:
                count = math.prod(shape)
                flat[offset:offset + count].copy_(next(stream).reshape(-1))  # the whole tensor freed after this
                offset += count
            self.broadcast(flat)

    def receive(self, plan: Plan) -> Iterator[tuple[str, torch.Tensor]]:
        """A receiver: each (name, tensor) of the plan as its bucket arrives, a view to copy before the next."""
        buffers = {}
        for bucket in plan:
            flat = self._bucket(bucket, buffers)
            self.broadcast(flat)
            offset = 0
            for name, shape, _ in bucket:
                count = math.prod(shape)
                yield name, flat[offset:offset + count].view(shape)
                offset += count

    def _bucket(self, bucket: list, buffers: dict) -> torch.Tensor:
        """One buffer per dtype for the whole sync, reused by every bucket: the memory is one bucket, whatever the
        allocator and the backend's bookkeeping do with a freed one."""
        count, dtype = sum(math.prod(shape) for _, shape, _ in bucket), bucket[0][2]
        if dtype not in buffers or buffers[dtype].numel() < count:
            buffers.pop(dtype, None)
            buffers[dtype] = torch.empty(count, dtype=dtype, device=self.device)
        return buffers[dtype][:count]


def model_parameters(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) with the names of the plain model: the wrappers' prefixes (activation checkpointing,
    compile) dropped, as in a state dict."""
    return [(next(iter(_get_fqns(module, name))), p) for name, p in module.named_parameters()]


def whole(parameter: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter sharded by FSDP or TP (a collective: every rank calls it), else itself."""
    return parameter.full_tensor() if isinstance(parameter, DTensor) else parameter.detach()


def synced_parameters(module: torch.nn.Module, adapters: bool = False
                      ) -> list[tuple[str, torch.Tensor, Callable[[], torch.Tensor]]]:
    """(name, parameter, what gives its whole value) of what the rollout engines hold: the plain model's weights.
    A LoRA policy's adapted weights are sent merged (W + B·A·alpha/rank, gathered a layer at a time), its adapters
    not at all: the engines run the plain architecture, whatever trains. adapters (ppo.lora_sync=adapters): the
    adapted layers' base weights unmerged and the adapters beside them, which the actors merge."""
    synced = []
    for raw, parameter in module.named_parameters():
        name = next(iter(_get_fqns(module, raw)))
        layer = module.get_submodule(raw.removesuffix(".weight")) if raw.endswith(".weight") else None
        if is_adapter(name):
            if adapters:
                synced.append((name, parameter, functools.partial(whole, parameter)))
        elif isinstance(layer, LoRALinear):
            synced.append((name, parameter, functools.partial(base_weight if adapters else merged, layer)))
        else:
            synced.append((name, parameter, functools.partial(whole, parameter)))
    return synced


def sent_dtype(parameter: torch.Tensor) -> torch.dtype:
    """What a parameter is sent as: its dtype, or float32 for a QLoRA base's int8 weight (sent dequantized)."""
    return parameter.dtype if parameter.is_floating_point() else torch.float32


def base_weight(layer: LoRALinear) -> torch.Tensor:
    """An adapted layer's whole frozen weight (a collective, like whole); a QLoRA base's dequantized."""
    base = whole(layer.weight)
    if base.dtype == torch.int8:
        return base.float() * layer.weight_scale[:, None]
    return base


def merged(layer: LoRALinear) -> torch.Tensor:
    """An adapted layer's whole weight with its update folded in (a collective, like whole)."""
    base = base_weight(layer)
    return merge(base, whole(layer.lora_A.weight), whole(layer.lora_B.weight), layer.scaling)


def merge(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + B·A·scaling in float32, in the base's dtype: the learner's merge and the actors' are this one."""
    return (base.float() + lora_b.float() @ lora_a.float() * scaling).to(base.dtype)


def adapted_layers(names: Iterable[str]) -> list[str]:
    """The layers whose adapters a plan's names include."""
    return [name.removesuffix(".lora_A.weight") for name in names if name.endswith(".lora_A.weight")]


class WeightSender:
    """The learner's side of the sync, on every rank (each takes part in the gathers); rank 0 also holds the side
    group with the rollout actors and drives them."""

    def __init__(self, module: torch.nn.Module, rank: int, actors: list, *, bucket_bytes: int, timeout_s: float,
                 nccl: bool, restarts: int, agree: Callable[[object], object], streamed: bool = True,
                 adapters: bool = False):
        """streamed: through the side group in buckets, else the whole policy through the object store. adapters
        (ppo.lora_sync=adapters, streamed): a LoRA policy's adapters only (and whatever else trains), once the
        actors hold its base from a whole sync (the first, and any after an actor was restarted)."""
        self.parameters = synced_parameters(module, adapters)
        self.updates = [p for p in self.parameters if is_adapter(p[0]) or p[1].requires_grad] if adapters else None
        self.scaling = next((m.scaling for m in module.modules() if isinstance(m, LoRALinear)), None) \
            if adapters else None
        self.plans = {whole_sync: bucket_plan([(n, tuple(p.shape), sent_dtype(p)) for n, p, _ in parameters],
                                              bucket_bytes)
                      for whole_sync, parameters in ((True, self.parameters), (False, self.updates or []))}
        self.plan = self.plans[True]
        self.rank, self.actors, self.timeout_s, self.restarts = rank, actors, timeout_s, restarts
        self.backend = "nccl" if nccl else "gloo"
        self.agree = agree  # rank 0's value on every rank
        self.group: SideGroup | None = None
        self.join_error: str | None = None
        self.peak_bytes = 0  # the most memory the last sync added on this rank
        self.bytes = sum(math.prod(shape) * dtype.itemsize for bucket in self.plan for _, shape, dtype in bucket)
        self.streamed = streamed

    def sync(self, version: tuple, fail_marker: str | None = None) -> None:
        """Every actor holds `version` of the weights afterwards; a gone actor (restarted by Ray) is sent them
        again, up to ppo.actor_restarts times."""
        errors = []
        for _ in range(self.restarts + 1):
            if self.streamed:
                receipts, whole_sync = self._start(version, fail_marker) if self.rank == 0 else (None, None)
                if self.updates is not None:  # which parameters every rank gathers: rank 0 chose
                    whole_sync = self.agree(whole_sync)
                error = self._stream(receipts, whole_sync is not False)
            else:
                error = self._put(version, fail_marker)
            if self.agree(error) is None:
                return
            errors.append(error)
            self.group, fail_marker = None, None  # a new group for the next try
        raise DataError(f"weight sync failed {len(errors)} times, the rollout actors kept failing; the last "
                        f"error: {errors[-1]}")

    def _start(self, version: tuple, fail_marker: str | None) -> tuple[list, bool]:
        """Rank 0: the actors' receive calls, in a group they all joined (a new one when an actor was restarted),
        and whether they take the whole policy (always, but with ppo.lora_sync=adapters in a group that has
        had one)."""
        import ray

        try:
            joined = ray.get([actor.side_group.remote() for actor in self.actors])  # waits for restarts
        except ray.exceptions.RayActorError as error:
            raise DataError(f"a rollout actor is gone for good (ppo.actor_restarts exhausted): {error}") from None
        store = None
        if self.group is None or any(name != self.group.spec.prefix for name in joined):
            store = dist.TCPStore(ray.util.get_node_ip_address(), 0, len(self.actors) + 1, is_master=True,
                                  wait_for_workers=False, timeout=datetime.timedelta(seconds=self.timeout_s))
            spec = SideSpec(ray.util.get_node_ip_address(), store.port, f"wsync-{uuid.uuid4().hex[:8]}",
                            len(self.actors) + 1, self.backend, self.timeout_s)
        else:
            spec = self.group.spec
        whole_sync = self.updates is None or store is not None
        # No retry of a receive: a restarted actor gets the next try's group instead.
        receipts = [actor.receive.options(max_task_retries=0).remote(spec, i + 1, self.plans[whole_sync], version,
                                                                      fail_marker if i == 0 else None, self.scaling)
                    for i, actor in enumerate(self.actors)]
        if store is not None:
            try:
                self.group = SideGroup(spec, 0, store)  # returns once every actor joined
            except RuntimeError as error:
                self.group = None
                self.join_error = f"a rollout actor did not join the side group: {error}"
        return receipts, whole_sync

    def _stream(self, receipts: list | None, whole_sync: bool) -> str | None:
        """Every rank gathers each whole tensor in the plan's order; rank 0 sends them. Rank 0's error, if any."""
        memory = TensorMemory()
        memory.track(p for _, p, _ in self.parameters)
        base = memory.current
        error = None
        sending = self.rank == 0 and self.group is not None
        with memory:
            tensors = (value() for _, _, value in (self.parameters if whole_sync else self.updates))
            if sending:
                try:
                    self.group.send(self.plans[whole_sync], tensors)
                except DataError as failure:
                    error = str(failure)
            for _ in tensors:  # the gathers left after a failed send (or all of them, on other ranks)
                pass
        self.peak_bytes = memory.peak - base
        if self.rank == 0:
            error = error or (None if sending else self.join_error)
            error = error or self._receipt_error(receipts)
        return error

    def _put(self, version: tuple, fail_marker: str | None) -> str | None:
        """The whole policy (gathered on every rank) through the object store: rank 0 puts it once, each actor
        fetches and loads it. Rank 0's error, if any."""
        import ray

        memory = TensorMemory()
        memory.track(p for _, p, _ in self.parameters)
        base = memory.current
        with memory:
            state = {name: value().cpu() for name, _, value in self.parameters}
        self.peak_bytes = memory.peak - base + self.bytes  # and the object store's copy
        if self.rank != 0:
            return None
        weights = ray.put(state)
        del state
        return self._receipt_error([actor.load.options(max_task_retries=0).remote(version, [weights],
                                                                                  fail_marker if i == 0 else None)
                                    for i, actor in enumerate(self.actors)])

    @staticmethod
    def _receipt_error(receipts: list) -> str | None:
        import ray

        try:
            ray.get(receipts)
            return None
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
            return f"a rollout actor failed while receiving: {error}"
