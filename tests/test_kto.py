"""KTO: unpaired labelled completions, the reference point over the global batch, the stage on the one loop."""

import json
import math

import pytest
import torch
from conftest import assert_same_curve, losses, metric, records

from raytrain.config import load_config
from raytrain.errors import DataError
from raytrain.stages import STAGES
from raytrain.stages.kto import KahnemanTversky
from raytrain.train.evaluate import with_reference_point
from raytrain.train.objectives import IGNORE

VOCAB = 30


def kto_rows() -> torch.Tensor:
    """Two examples [2, 5, 8]: a desirable reply `20 21 eos` and an undesirable `22 eos` to prompt `4 10 1 5`, each
    with its mismatched pair (the prompt with the other's completion) and its label."""
    first, second = [4, 10, 1, 5, 20, 21, 1, 0], [4, 11, 1, 5, 22, 1, 0, 0]
    first_mask, second_mask = [0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 0, 0]
    kl_first, kl_second = [4, 10, 1, 5, 22, 1, 0, 0], [4, 11, 1, 5, 20, 21, 1, 0]
    return torch.tensor([[first, first_mask, kl_first, second_mask, [1] * 8],
                         [second, second_mask, kl_second, first_mask, [0] * 8]])


def logits_with(boosts: dict[tuple[int, int], float], targets: torch.Tensor) -> torch.Tensor:
    """Logits 0 (each token log-prob −log 30) but `boost` at (row, position) for that position's target token."""
    logits = torch.zeros(*targets.shape, VOCAB)
    for (row, position), boost in boosts.items():
        logits[row, position, targets[row, position]] = boost
    return logits


def test_kto_loss_and_reference_point_by_hand():
    objective = KahnemanTversky(0, beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    inputs, targets = objective(kto_rows(), 0, 0)
    assert inputs.shape == (2, 6) and targets.labels.tolist() == [1, 0]
    assert targets.tokens.tolist() == [[IGNORE] * 3 + [20, 21, 1], [IGNORE] * 3 + [22, 1, IGNORE]]
    assert targets.kl_tokens.tolist() == [[IGNORE] * 3 + [22, 1, IGNORE], [IGNORE] * 3 + [20, 21, 1]]
    uniform = -math.log(VOCAB)

    def boosted(b):  # a boosted token's log-prob
        return b - math.log(VOCAB - 1 + math.exp(b))

    # The reference is uniform; the policy boosts the desirable reply's first token by 2 and the undesirable
    # reply's first token by 1; on the mismatched pairs it boosts the first row's first reply token by 3.
    reference = objective.with_reference(targets, torch.zeros(2, 6, VOCAB))
    policy_kl = logits_with({(0, 3): 3.0}, targets.kl_tokens)
    kl = objective.kl_sums(policy_kl, torch.zeros(2, 6, VOCAB), reference)
    assert kl.tolist() == pytest.approx([boosted(3.0) - uniform, 2.0])
    point = (boosted(3.0) - uniform) / 2
    completed = objective.with_point(reference, kl)
    assert completed.reference_point.item() == pytest.approx(point)

    loss, sums = objective.loss(logits_with({(0, 3): 2.0, (1, 3): 1.0}, targets.tokens), completed)
    r_good, r_bad = boosted(2.0) - uniform, boosted(1.0) - uniform

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    expected = 1.0 * (1 - sigmoid(0.5 * (r_good - point))) + 2.0 * (1 - sigmoid(0.5 * (point - r_bad)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    right = int(r_good > point) + int(r_bad < point)
    assert sums.tolist() == pytest.approx([2, right, 0.5 * r_good, 1, 0.5 * r_bad, 1, 2 * point], rel=1e-6)
    metrics = objective.metrics(torch.cat([loss.detach().double().reshape(1), sums]), "train")
    assert metrics["kto/margin"] == pytest.approx(0.5 * (r_good - r_bad), rel=1e-6)
    assert metrics["kto/kl"] == pytest.approx(point, rel=1e-6) and metrics["kto/loss"] == pytest.approx(expected / 2)

    # A policy far below the reference on the mismatched pairs: the point is clamped at 0.
    below = objective.with_point(reference, objective.kl_sums(logits_with({(0, 3): -5.0}, targets.kl_tokens),
                                                             torch.zeros(2, 6, VOCAB), reference))
    assert below.reference_point.item() == 0.0
    # A blank row (past a split's end) counts nothing, not even in the point's estimate.
    _, blank = objective(torch.zeros(1, 5, 8, dtype=torch.long), 0, 0)
    assert objective.count(blank).item() == 0
    assert objective.kl_sums(torch.zeros(1, 1, VOCAB), torch.zeros(1, 1, VOCAB), blank).tolist() == [0.0, 0.0]


def test_reference_point_is_the_whole_global_batch_s():
    """Split into micro-batches, every micro-batch gets the point of all of them (here: one process's reduce)."""
    objective = KahnemanTversky(0, beta=0.5, desirable_weight=1.0, undesirable_weight=1.0)

    class Boost(torch.nn.Module):  # a policy that makes tokens 22 and eos (1) likelier everywhere
        def forward(self, inputs, causal=True):
            logits = torch.zeros(*inputs.shape, VOCAB)
            logits[..., [1, 22]] = 4.0
            return logits

    class Uniform(torch.nn.Module):
        def forward(self, inputs, causal=True):
            return torch.zeros(*inputs.shape, VOCAB)

    rows = kto_rows()
    whole = with_reference_point(objective, Boost(), Uniform(), [objective(rows, 0, 0)], torch.no_grad,
                                 lambda s: s)
    split = with_reference_point(objective, Boost(), Uniform(), [objective(rows[:1], 0, 0),
                                                                 objective(rows[1:], 0, 1)], torch.no_grad,
                                 lambda s: s)
    points = {t.reference_point.item() for _, t in (*whole, *split)}
    assert len(points) == 1 and points.pop() > 0  # row 0's pair (22 eos) gains more than row 1's (20 21 eos) loses


@pytest.mark.ray
def test_kto_data_and_stage_learn_and_two_workers_match_one(reference, tiny_tokenizer, tmp_path):
    from raytrain.data.chat_data import run_kto_data_stage
    from raytrain.data.manifest import PreparedDataset
    from raytrain.train.local import run_local

    # Records without a label are refused by file:line before anything is written.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Is it?", "completion": "Yes.", "label": True}) + "\n"
                   + json.dumps({"prompt": "Is it?", "completion": "No."}) + "\n")

    def data(name, source):
        out = tmp_path / name
        run_kto_data_stage(load_config("tiny", [f"data.source.inputs=[{source}]", "data.prepare.seq_len=64",
                                                f"data.prepare.tokenizer='{tiny_tokenizer}'",
                                                f"data.prepare.out='{out}'"]))
        return out

    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'label' is missing; KTO needs each completion"):
        data("bad", f"'{bad}'")
    assert not (tmp_path / "bad").exists()
    dataset = data("kto", "stdlib-kto")
    manifest = PreparedDataset.open(dataset).manifest
    assert manifest["kind"] == "kto" and manifest["columns"][-1] == "label"
    train = manifest["splits"]["train"]
    assert 0.4 < train["desirable"] / train["rows"] < 0.6  # each stdlib pair gives one of each

    def kto(name, *overrides, in_process=False):
        config = load_config("tiny", [f"run.root='{tmp_path}'", f"run.name={name}", f"train.data='{dataset}'",
                                      f"train.init_from='{reference[0]}'", "train.steps=20", "train.lr=0.002",
                                      "train.kto_beta=0.5", *overrides])
        return run_local(config, STAGES["kto"]) if in_process else STAGES["kto"].run(config)

    kto("one", "parallel.workers=1", in_process=True)
    one = losses(tmp_path / "one")
    # The policy starts as its reference: r = 0 and z_ref = 0, so each completion's loss is 1 − σ(0) = 0.5.
    assert one[1] == pytest.approx(0.5, abs=1e-6)
    val, margin = metric(tmp_path / "one", "val/loss"), metric(tmp_path / "one", "val/margin")
    assert val[20] < val[0] and margin[20] > margin[0] + 0.05, (val, margin)
    assert set(STAGES["kto"].metrics) - {"mem/tensor_peak_gib"} <= set(records(tmp_path / "one")[-1])
    assert max(metric(tmp_path / "one", "kto/kl").values()) > 0  # the point moves off 0 as the policy does
    # Two FSDP workers under Ray Train, each with half the batch in two micro-batches: the reference point is the
    # whole global batch's, so the curve is the one worker's.
    kto("fsdp2", "parallel.workers=2", "train.micro_batches=2")
    assert_same_curve(one, losses(tmp_path / "fsdp2"))
