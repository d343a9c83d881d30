"""The reward model on the one loop: final-token scores, the Bradley–Terry loss, heads, HF export, layouts."""

import math

import pytest
import torch
from conftest import assert_same_curve, losses, metric, records

from raytrain.config import load_config
from raytrain.data.manifest import PreparedDataset
from raytrain.errors import ConfigError, DataError
from raytrain.model.transformer import Transformer
from raytrain.stages import STAGES
from raytrain.train.checkpoint import load_weights, save_model
from raytrain.train.objectives import (
    PairwiseReward,
    final_positions,
    pairwise_loss,
    ranked_pairs,
    response_scores,
    score_statistics,
)

PAD = 2


def prefs_rows() -> torch.Tensor:
    """Two prompts, three response slots each, best first; the second prompt has only two responses."""
    return torch.tensor([
        [[4, 10, 5, 20, 1, PAD, PAD, PAD], [4, 10, 5, 21, 22, 23, 1, PAD], [4, 10, 5, 1, PAD, PAD, PAD, PAD]],
        [[4, 11, 5, 24, 25, 1, PAD, PAD], [4, 11, 5, 26, 1, PAD, PAD, PAD], [PAD] * 8],
    ])


def test_rows_become_responses_read_at_their_final_token_and_ranked_pairs():
    rows = prefs_rows()
    assert final_positions(rows, PAD).tolist() == [[4, 6, 3], [5, 4, -1]]
    inputs, (ends, _) = PairwiseReward(PAD, multiple=1)(rows, 0, 0)
    assert inputs.shape == (6, 7)  # cut after the longest response
    assert PairwiseReward(PAD, multiple=3)(rows, 0, 0)[0].shape == (6, 9)  # padded up to a multiple of 3
    assert ranked_pairs(ends).nonzero().tolist() == [[0, 0, 1], [0, 0, 2], [0, 1, 2], [1, 0, 1]]
    outputs = torch.arange(6 * 7, dtype=torch.float32).reshape(6, 7, 1)
    assert response_scores(outputs, ends).tolist() == [[4, 13, 17], [26, 32, 0]]


def test_bradley_terry_loss_accuracy_and_margin_by_hand():
    scores = torch.tensor([[2.0, 0.5, -1.0], [1.0, 3.0, 0.0]], requires_grad=True)
    pairs = ranked_pairs(torch.tensor([[7, 7, 7], [7, 7, -1]]))
    loss, (count, right, margin) = pairwise_loss(scores, pairs)

    def nll(d):  # −log σ(d)
        return -math.log(1 / (1 + math.exp(-d)))

    assert loss.item() == pytest.approx(nll(1.5) + nll(3.0) + nll(1.5) + nll(-2.0), rel=1e-6)
    assert (count, right, margin) == (4, 3, pytest.approx(1.5 + 3.0 + 1.5 - 2.0))
    loss.backward()  # d/ds_i of softplus(s_j − s_i) = −σ(s_j − s_i)
    assert scores.grad[1].tolist() == pytest.approx([-torch.sigmoid(torch.tensor(2.0)).item(),
                                                     torch.sigmoid(torch.tensor(2.0)).item(), 0.0])
    metrics = PairwiseReward(PAD).metrics(torch.tensor([loss.item(), 4, 3, 4.0], dtype=torch.float64), "val")
    assert metrics == {"val/loss": pytest.approx(loss.item() / 4), "val/accuracy": 0.75, "val/margin": 1.0}
    stats = score_statistics(torch.tensor([4, 2.0, 9.0], dtype=torch.float64))
    assert stats == {"mean": 0.5, "std": pytest.approx(math.sqrt(9 / 4 - 0.25)), "responses": 4}


def reward_model(seed: int = 0) -> Transformer:
    model = Transformer(load_config("tiny").model, head="score")
    model.init_weights(seed)
    return model.eval()


def test_a_score_does_not_depend_on_padding_or_the_other_responses():
    model = reward_model()
    rows = prefs_rows()
    inputs, (ends, _) = PairwiseReward(PAD)(rows, 0, 0)
    batched = response_scores(model(inputs), ends)
    alone = model(rows[0, 1, :7].unsqueeze(0))[0, -1, 0]
    torch.testing.assert_close(batched[0, 1], alone, rtol=1e-5, atol=1e-6)


def test_a_reward_model_starts_from_a_language_models_trunk(tmp_path):
    config = load_config("tiny").model
    language_model = Transformer(config)
    language_model.init_weights(1)
    save_model(tmp_path / "lm", language_model, {"step": 0, "objective": "sft"})
    model = reward_model(seed=2)
    fresh_head = model.score.weight.clone()
    load_weights(tmp_path / "lm", model)
    torch.testing.assert_close(model.embed_tokens.weight, language_model.embed_tokens.weight)
    torch.testing.assert_close(model.layers["3"].mlp.down_proj.weight, language_model.layers["3"].mlp.down_proj.weight)
    torch.testing.assert_close(model.score.weight, fresh_head)  # its own head, not the vocabulary projection
    save_model(tmp_path / "rm", model, {"step": 0, "objective": "reward"})
    with pytest.raises(DataError, match=r"lacks the model's weights \['lm_head.weight'\]"):
        load_weights(tmp_path / "rm", Transformer(config))


def test_hugging_face_sequence_classification_scores_equal_ours(tmp_path):
    transformers = pytest.importorskip("transformers")
    from raytrain.model.hf import save_hf

    model = reward_model(seed=3)
    save_hf(model, tmp_path / "hf")
    hf = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == PAD
    inputs, (ends, _) = PairwiseReward(PAD)(prefs_rows(), 0, 0)
    present = (ends >= 0).flatten()
    with torch.no_grad():
        ours = response_scores(model(inputs), ends).flatten()[present]
        theirs = hf(input_ids=inputs[present]).logits[:, 0]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.ray
def test_reward_model_learns_rankings_and_every_layout_and_a_restart_match_one_worker(
        reference, tiny_prefs_dataset, tiny_sft_dataset, capsys, tmp_path):
    from raytrain.cli import main
    from raytrain.train.checkpoint import read_checkpoint_meta, resolve_checkpoint
    from raytrain.train.local import run_local

    def reward(name, *overrides, in_process=False):
        config = load_config("tiny", [f"run.root='{tmp_path}'", f"run.name={name}",
                                      f"train.data='{tiny_prefs_dataset}'", f"train.init_from='{reference[0]}'",
                                      "train.steps=20", "train.lr=0.002", *overrides])
        return run_local(config, STAGES["reward"]) if in_process else STAGES["reward"].run(config)

    # The one-worker curve from the same loop without Ray Train (test_pretrain shows the two agree).
    summary = reward("one", "parallel.workers=1", in_process=True)
    one = losses(tmp_path / "one")
    accuracy = metric(tmp_path / "one", "val/accuracy")
    assert accuracy[20] > max(0.6, accuracy[0] + 0.1), accuracy  # held-out rankings learnt
    record = records(tmp_path / "one")[-1]
    untracked = {"mem/tensor_peak_gib"}  # logged on CPU with debug.track_memory only
    assert set(STAGES["reward"].metrics) - untracked <= set(record) and record["step"] == 20 and "val/ppl" not in record
    assert record["rm/loss"] == record["train/loss"] and 0 <= record["rm/accuracy"] <= 1
    meta = read_checkpoint_meta(resolve_checkpoint(summary["checkpoint"]))
    train_rows = PreparedDataset.open(tiny_prefs_dataset).split("train").num_rows
    # Every response of the train split scored once (stdlib-prefs ranks two a prompt).
    assert meta["objective"] == "reward" and meta["reward"]["responses"] == 2 * train_rows
    assert meta["reward"]["std"] > 0
    # The same under FSDP, whose ranks score half the split each.
    reward("fsdp2", "parallel.workers=2", "train.max_failures=1", "debug.fail_at_step=13", "debug.fail_rank=1")
    assert (tmp_path / "fsdp2" / ".debug_failed_once").read_text() == "resumed from step 10\n"  # died at 13
    assert_same_curve(one, losses(tmp_path / "fsdp2"))
    fsdp_meta = read_checkpoint_meta(resolve_checkpoint(tmp_path / "fsdp2"))
    assert fsdp_meta["reward"]["responses"] == meta["reward"]["responses"]
    assert fsdp_meta["reward"]["mean"] == pytest.approx(meta["reward"]["mean"], rel=1e-4, abs=1e-5)
    # Packed responses (train.packing): the padded curve within 1e-4 over 20 steps in one process and under tp2 (one
    # step's loss and gradients agree within 1e-5: test_packed_responses_give_the_padded_loss_and_gradients).
    reward("packed", "parallel.workers=1", "train.packing=true", in_process=True)
    assert_same_curve(one, losses(tmp_path / "packed"))
    reward("tp2", "parallel.workers=2", "parallel.tp=2", "parallel.cpus_per_worker=0.5", "train.packing=true")
    assert_same_curve(one, losses(tmp_path / "tp2"))

    # The commands on the checkpoint: eval's pairwise accuracy, score, HF export, refusals.
    checkpoint = str(tmp_path / "one")
    assert main(["eval", "--checkpoint", checkpoint, "--data", str(tiny_prefs_dataset), "--batches", "2",
                 "--batch-size", "8"]) == 0
    assert f"pairwise accuracy {accuracy[20]:.3f}" in capsys.readouterr().out
    assert main(["score", "--checkpoint", checkpoint, "--prompt", "What does `json.dumps` do?",
                 "--response", "Serialize obj to a JSON formatted str.", "--response", "obj JSON"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "(normalised " in lines[0] and lines[1].endswith("obj JSON")
    assert main(["generate", "--checkpoint", checkpoint, "--prompt", "x"]) == 2
    assert "is a reward model" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", checkpoint, "--data", str(tiny_sft_dataset)]) == 2
    assert "a reward model is evaluated on `raytrain data prefs` output" in capsys.readouterr().err
    assert main(["score", "--checkpoint", str(reference[0]), "--prompt", "x", "--response", "y"]) == 2
    assert "is a language model; score with a reward model" in capsys.readouterr().err
    assert main(["reward", "--config", "tiny", "--data", str(tiny_prefs_dataset), "--steps", "1"]) == 2
    assert "a reward model starts from a model: pass --init" in capsys.readouterr().err
    assert main(["convert", "to-hf", checkpoint, "--out", str(tmp_path / "hf")]) == 0
    assert "LlamaForSequenceClassification" in (tmp_path / "hf" / "config.json").read_text()

    # Refused before any worker starts: a pipeline, fine-tuning data, preference data given to sft.
    with pytest.raises(ConfigError, match="`raytrain reward` cannot run under parallel.pp=2"):
        reward("pp", "parallel.workers=2", "parallel.pp=2")
    with pytest.raises(DataError, match="holds sft data .* `raytrain reward` reads `raytrain data prefs`"):
        reward("sft-data", f"train.data='{tiny_sft_dataset}'")
    with pytest.raises(DataError, match="holds prefs data .* `raytrain sft` reads `raytrain data sft`"):
        STAGES["sft"].run(load_config("tiny", [f"train.data='{tiny_prefs_dataset}'",
                                               f"train.init_from='{reference[0]}'"]))


def reward_step(world: int, sequence_parallel: bool):
    """Loss and gradients of one reward-model step on `prefs_rows`, then an optimizer step (it must accept the
    layout's parameters)."""
    from raytrain.parallel.layout import build_layout, parallelize
    from raytrain.train.optim import build_optimizer

    config = load_config("tiny", [f"parallel.workers={world}", f"parallel.tp={world}",
                                  f"parallel.sequence_parallel={str(sequence_parallel).lower()}"])
    model = Transformer(config.model, head="score")
    model.init_weights(0)
    module = parallelize(model, config.parallel, build_layout(config.parallel, world, torch.device("cpu")),
                         torch.device("cpu"), bf16=False)
    optimizer = build_optimizer(model, config.train)
    objective = PairwiseReward(PAD, multiple=world)
    inputs, targets = objective(prefs_rows(), 0, 0)
    loss, sums = objective.loss(module(inputs), targets)
    (loss / sums[0]).backward()
    grads = {name: p.grad.full_tensor() if world > 1 else p.grad for name, p in model.named_parameters()}
    optimizer.step()
    return float(loss.detach()), grads


def tensor_parallel_rank(rank: int, folder: str, sequence_parallel: bool) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    try:
        result = reward_step(2, sequence_parallel)
        if rank == 0:
            torch.save(result, f"{folder}/result.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sequence_parallel", [True, False])
def test_tensor_parallel_reward_model_replicates_its_head_and_matches_one_process(tmp_path, sequence_parallel):
    import torch.multiprocessing as mp

    loss, grads = reward_step(1, sequence_parallel)
    mp.spawn(tensor_parallel_rank, args=(str(tmp_path), sequence_parallel), nprocs=2)
    tp_loss, tp_grads = torch.load(tmp_path / "result.pt")
    assert abs(tp_loss - loss) < 1e-5 and grads.keys() == tp_grads.keys()
    assert grads["score.weight"].abs().sum() > 0
    for name, grad in grads.items():
        torch.testing.assert_close(tp_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
