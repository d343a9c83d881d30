"""Supervised fine-tuning on the one loop: the answer-token objective, padding per batch, layouts."""

import pytest
import torch
from conftest import assert_same_curve, losses, metric

from raytrain.config import load_config
from raytrain.errors import ConfigError, DataError
from raytrain.model.transformer import Transformer
from raytrain.train.objectives import IGNORE, Objective, supervised, token_loss, trim_padding


def sft_rows() -> torch.Tensor:
    tokens = torch.tensor([[4, 10, 11, 1, 5, 20, 21, 1, 2, 2, 2, 2],
                           [4, 12, 1, 5, 22, 1, 2, 2, 2, 2, 2, 2]])
    mask = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0],
                         [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0]])
    return torch.stack([tokens, mask], dim=1)


def test_only_answer_tokens_are_targets():
    inputs, targets = supervised(sft_rows())
    assert inputs.tolist()[1] == [4, 12, 1, 5, 22, 1, 2, 2, 2, 2, 2]
    assert targets.tolist()[0] == [IGNORE] * 4 + [20, 21, 1] + [IGNORE] * 4
    assert targets.tolist()[1] == [IGNORE] * 3 + [22, 1] + [IGNORE] * 6


def test_padding_per_batch_keeps_the_loss():
    rows = sft_rows()
    assert trim_padding(rows, 1).shape[-1] == 8  # inputs up to the last target (position 7)
    assert trim_padding(rows, 3).shape[-1] == 10  # inputs a multiple of 3 long
    config = load_config("tiny").model
    model = Transformer(config)
    model.init_weights(0)
    full = token_loss(model(*supervised(rows)[:1]), supervised(rows)[1])
    objective = Objective("sft", seed=0, global_batch=2, mask_fraction=0.0, mask_id=6, trim_multiple=1)
    inputs, targets = objective(rows, 0, 0)
    trimmed = token_loss(model(inputs), targets)
    assert inputs.shape[1] == 7 and int(trimmed[1]) == int(full[1]) == 5
    torch.testing.assert_close(trimmed[0], full[0], rtol=1e-6, atol=1e-6)


def test_packed_rows_give_the_padded_loss_and_gradients():
    from raytrain.train.packing import first_fit, model_call

    assert first_fit([3, 7, 2, 5, 4], capacity=8) == [[1], [3, 0], [4, 2]]  # longest first, first row with room
    generator = torch.Generator().manual_seed(0)
    rows = torch.zeros(6, 2, 24, dtype=torch.long)
    for row, (prompt, answer) in enumerate([(5, 6), (3, 2), (9, 8), (4, 12), (2, 3), (0, 0)]):  # the last: blank
        length = prompt + answer
        rows[row, 0, :length] = torch.randint(7, 97, (length,), generator=generator)
        rows[row, 1, prompt:length] = 1
    config = load_config("tiny").model
    model = Transformer(config)
    model.init_weights(0)

    def loss_and_grads(objective):
        model.zero_grad()
        inputs, targets = objective(rows, 0, 0)
        loss, count = token_loss(model_call(model, inputs, True), targets)
        loss.backward()
        return inputs, loss, count, [p.grad.clone() for p in model.parameters()]

    common = {"seed": 0, "global_batch": 6, "mask_fraction": 0.0, "mask_id": 6}
    padded_inputs, padded, padded_count, padded_grads = loss_and_grads(Objective("sft", trim_multiple=2, **common))
    packed_inputs, packed, packed_count, packed_grads = loss_and_grads(Objective("sft", trim_multiple=2, packing=True,
                                                                                 **common))
    assert padded_inputs.shape == (6, 16) and packed_inputs.tokens.shape == (3, 20)  # 96 positions → 60
    assert packed_inputs.numel() == 10 + 4 + 16 + 15 + 4  # each example up to its last target
    assert int(packed_count) == int(padded_count) == 6 + 2 + 8 + 12 + 3
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    for a, b in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.ray
def test_sft_learns_answers_and_every_layout_and_a_restart_match_one_worker(reference, tiny_sft_dataset,
                                                                           tiny_dataset, tmp_path):
    from raytrain.stages import STAGES
    from raytrain.train.local import run_local

    run_sft = STAGES["sft"].run

    def sft(name, *overrides, in_process=False):
        config = load_config("tiny", [f"run.root='{tmp_path}'", f"run.name={name}",
                                      f"train.data='{tiny_sft_dataset}'", f"train.init_from='{reference[0]}'",
                                      "train.steps=20", "train.lr=0.002", *overrides])
        return run_local(config, STAGES["sft"]) if in_process else run_sft(config)

    # The one-worker curve from the same loop without Ray Train (test_pretrain shows the two agree).
    summary = sft("one", "parallel.workers=1", in_process=True)
    one = losses(tmp_path / "one")
    val = metric(tmp_path / "one", "val/loss")
    assert val[20] < val[0] - 0.3, val  # answers get likelier
    assert summary["checkpoint"].endswith("step_000020")
    sft("fsdp2", "parallel.workers=2")
    assert_same_curve(one, losses(tmp_path / "fsdp2"))
    # Packed rows (train.packing): the padded run's loss within 1e-5 at every step in one process, and on dp2 × tp2
    # (sequence parallel) workers its curve within the layouts' 1e-4.
    sft("packed", "parallel.workers=1", "train.packing=true", in_process=True)
    assert_same_curve(one, losses(tmp_path / "packed"), tol=1e-5)
    sft("packed-dp2-tp2", "parallel.workers=4", "parallel.tp=2", "parallel.cpus_per_worker=0.5", "train.packing=true")
    assert_same_curve(one, losses(tmp_path / "packed-dp2-tp2"))
    with pytest.raises(ConfigError, match="train.packing gives each step a different number of rows"):
        STAGES["sft"].preflight(load_config("tiny", [f"train.data='{tiny_sft_dataset}'", "train.packing=true",
                                                     f"train.init_from='{reference[0]}'", "parallel.pp=2",
                                                     "parallel.workers=2"]))
    # A worker dies at step 13 (DDP): Ray Train restarts the group, which resumes from step 10 exactly.
    sft("faulty", "parallel.workers=2", "parallel.dp_replicate=2", "train.max_failures=1", "debug.fail_at_step=13",
        "debug.fail_rank=1")
    assert (tmp_path / "faulty" / ".debug_failed_once").read_text() == "resumed from step 10\n"
    assert_same_curve(one, losses(tmp_path / "faulty"))

    # The weights fix the architecture: a config's other model section gives way to the checkpoint's.
    other = STAGES["sft"].preflight(load_config("tiny", [f"train.data='{tiny_sft_dataset}'",
                                                        f"train.init_from='{reference[0]}'", "model.d_model=64"]))
    assert other.model == load_config("tiny").model
    # Refused before any worker starts: pre-training data, no --init.
    with pytest.raises(DataError, match="holds pretrain data .* `raytrain sft` reads `raytrain data sft`"):
        run_sft(load_config("tiny", [f"train.data='{tiny_dataset}'", f"train.init_from='{reference[0]}'"]))
    with pytest.raises(ConfigError, match="pass --init"):
        run_sft(load_config("tiny", [f"train.data='{tiny_sft_dataset}'"]))


def test_validation_counts_replies_that_greedy_decoding_reproduces_exactly():
    """val/accuracy: a reply (a run of targeted positions, padded or packed) counts when every token is the argmax."""
    from raytrain.train.objectives import IGNORE, SupervisedObjective, exact_replies

    targets = torch.tensor([[IGNORE, 3, 4, IGNORE, 5, IGNORE], [IGNORE, IGNORE, 1, 2, IGNORE, IGNORE]])
    logits = torch.nn.functional.one_hot(targets.clamp(min=0), 8).float()
    logits[0, 4, 6] = 2.0  # the second reply of row 0 (one token) is not the argmax
    assert exact_replies(logits, targets).tolist() == [3.0, 2.0]
    objective = SupervisedObjective("sft", seed=0, global_batch=2, mask_fraction=0.0, mask_id=6)
    with torch.no_grad():
        loss, sums = objective.loss(logits, targets)
    assert sums.tolist() == [5.0, 3.0, 2.0]
    totals = torch.cat([loss.double().reshape(1), sums])  # as the loop sums them
    assert objective.metrics(totals, "val")["val/accuracy"] == pytest.approx(2 / 3)
    assert "val/accuracy" not in objective.metrics(totals[:2], "val")  # a pipeline's sums: loss and count only
    loss, train_sums = objective.loss(logits.requires_grad_(), targets)
    assert train_sums.tolist() == [5.0, 0.0, 0.0]
    assert "val/accuracy" not in objective.metrics(torch.cat([loss.detach().double().reshape(1), train_sums]), "train")
