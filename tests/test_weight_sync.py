"""The weight sync between a learner and real rollout actors (Ray actors, a gloo side group), without Ray Train:
the whole policy arrives bucket by bucket, the sender's extra memory is about one bucket, an actor killed mid-sync
is restarted and sent the weights again (streamed, and through the object store: ppo.weight_sync=object_store),
and an actor gone for good fails in one line. The same
path under dp2 FSDP and TP with a killed actor runs in tests/test_ppo.py."""

import math

import pytest
import ray
import torch

from raytrain.errors import DataError
from raytrain.model.transformer import Transformer, TransformerConfig
from raytrain.rlhf.actors import NAMESPACE, RolloutActor, StaleWeights
from raytrain.rlhf.weight_sync import WeightSender, bucket_plan

CONFIG = TransformerConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
BUCKET = 8_000  # bytes: the 9,600-byte embedding alone, the blocks' tensors several to a bucket


def test_bucket_plan_keeps_order_and_size():
    shapes = [("a", (10,), torch.float32), ("b", (3000,), torch.float32), ("c", (5,), torch.float32),
              ("d", (5,), torch.bfloat16), ("e", (5,), torch.float32)]
    plan = bucket_plan(shapes, 4_000)
    assert [[name for name, _, _ in bucket] for bucket in plan] == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert [[n for n, _, _ in b] for b in bucket_plan(shapes[:1] + shapes[2:3], 4_000)] == [["a", "c"]]
    assert all(len({dtype for _, _, dtype in bucket}) == 1 for bucket in plan)


@pytest.mark.ray
def test_streamed_sync_reaches_every_actor_and_survives_a_killed_one(ray_session, tmp_path):
    learner = Transformer(CONFIG)
    learner.init_weights(0)
    actors = [RolloutActor.options(num_cpus=0.1, namespace=NAMESPACE, max_restarts=2, max_task_retries=2)
              .remote(vars(CONFIG), 1) for _ in range(2)]
    sender = WeightSender(learner, 0, actors, bucket_bytes=BUCKET, timeout_s=30, nccl=False, restarts=1,
                          agree=lambda value: value)
    assert len(sender.plan) > 3 and sender.streamed

    def assert_actors_hold(version):
        for actor in actors:
            held, weights = ray.get(actor.weights.remote())
            assert held == version and all(torch.equal(weights[k], v) for k, v in learner.state_dict().items())

    sender.sync(("s", 0))
    assert_actors_hold(("s", 0))
    largest = max(math.prod(shape) * 4 for bucket in sender.plan for _, shape, _ in bucket)
    assert 0 < sender.peak_bytes <= BUCKET + largest < sum(p.numel() * 4 for p in learner.parameters()) / 2
    with pytest.raises(StaleWeights, match="holds weights"):  # generating from other weights is refused
        ray.get(actors[0].generate.remote(("s", 1), [[1, 2]], [0], {"max_new_tokens": 2}))

    # Actor 0 dies after its first tensor: Ray restarts it, the sync tries again in a new group; the same weights.
    with torch.no_grad():
        for p in learner.parameters():
            p.mul_(1.5)
    marker = tmp_path / "died"
    sender.sync(("s", 1), str(marker))
    assert marker.exists()
    assert_actors_hold(("s", 1))

    # Through the object store (ppo.weight_sync=object_store), with the same recovery.
    small = WeightSender(learner, 0, actors, bucket_bytes=BUCKET, timeout_s=30, nccl=False, restarts=1,
                         agree=lambda value: value, streamed=False)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.25)
    small.sync(("s", 2), str(tmp_path / "died-again"))
    assert (tmp_path / "died-again").exists()
    assert_actors_hold(("s", 2))
    assert small.peak_bytes == small.bytes  # the object store's copy; a CPU learner's policy needs no gathering

    # Gone for good (no restarts left): one line, no hang.
    ray.kill(actors[1], no_restart=True)
    with pytest.raises(DataError, match="a rollout actor is gone for good"):
        sender.sync(("s", 3))
    ray.kill(actors[0], no_restart=True)
