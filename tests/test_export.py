"""ONNX export: the graphs equal the model, quantized exports stay close, generation and evaluation on
onnxruntime, and bad input refused in one line."""

import json
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from raytrain.cli import main
from raytrain.data.tokenizer import load_tokenizer, tokenizer_hash
from raytrain.export import commands
from raytrain.export.commands import export_onnx
from raytrain.export.folder import CONFIG_FILE, WEIGHTS_FILE, folder_bytes
from raytrain.export.graphs import DECODE, PREFILL, cache_names
from raytrain.export.quantize import quantize_folder
from raytrain.export.runtime import OnnxModel
from raytrain.inference import score_conversations
from raytrain.model.config import TransformerConfig
from raytrain.model.generate import generate
from raytrain.model.transformer import Transformer
from raytrain.train.checkpoint import save_model
from tests.test_cli_errors import assert_one_line_error


def make_checkpoint(folder: Path, tokenizer: Path, head: str = "lm", seed: int = 0) -> Transformer:
    """A seeded model (tied embeddings: the shared weight must export and quantize) saved as a checkpoint."""
    vocab = load_tokenizer(tokenizer).get_vocab_size()
    config = TransformerConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48,
                               tie_embeddings=head == "lm")
    model = Transformer(config, head=head)
    model.init_weights(seed)
    with torch.no_grad():  # larger logits than at init, so greedy choices are not near-ties
        model.lm_head.weight.mul_(20) if head == "lm" else model.score.weight.mul_(20)
    save_model(folder, model, {"step": 3, "objective": "reward" if head == "score" else "sft", "seed": 0,
                               "mask_fraction": 0.15, "tokenizer": {"path": str(tokenizer),
                                                                    "sha256": tokenizer_hash(tokenizer)}})
    return model.eval()


def export(capsys, checkpoint: Path, out: Path, *flags: str) -> str:
    assert main(["export", "onnx", str(checkpoint), "--out", str(out), *flags]) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def language_model(plain_tokenizer, tmp_path_factory):
    """(model, checkpoint, fp32 export) of a small language model, exported once for the module."""
    root = tmp_path_factory.mktemp("export")
    model = make_checkpoint(root / "ckpt", plain_tokenizer)
    assert main(["export", "onnx", str(root / "ckpt"), "--out", str(root / "fp32")]) == 0
    return model, root / "ckpt", root / "fp32"


@torch.no_grad()
def test_fp32_graphs_match_the_model_and_greedy_tokens_equal(language_model, capsys):
    model, _, folder = language_model
    exported = OnnxModel(folder, graphs=(PREFILL, DECODE))
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["quantization"] == "none" and config["max_length"] == 48 and set(config["graphs"]) == {
        PREFILL, DECODE} and config["weights"] == WEIGHTS_FILE and config["format"] == "raytrain.onnx/2"
    # The graphs hold no weights of their own: the one weights file holds each tensor once, both graphs pointing
    # at the same bytes (64-byte aligned), and the folder weighs the model's weights once (the output matrix,
    # tied to the embedding in the model, is the graphs' own weight).
    external = [{t.name: {e.key: e.value for e in t.external_data} for t in onnx.load(
        folder / name, load_external_data=False).graph.initializer if t.external_data} for name in (PREFILL, DECODE)]
    assert external[0]["model.embed_tokens.weight"] == external[1]["model.embed_tokens.weight"] == {
        "location": WEIGHTS_FILE, "offset": "0", "length": str(4 * model.embed_tokens.weight.numel())}
    assert all(int(e["offset"]) % 64 == 0 for graph in external for e in graph.values())
    weights = 4 * (model.num_params() + model.lm_head.weight.numel())
    assert weights * 0.98 < (folder / WEIGHTS_FILE).stat().st_size < weights * 1.02
    assert folder_bytes(folder, config["graphs"]) < weights * 1.2
    assert config["graphs"][DECODE]["inputs"]["past.1.value"] == ["batch", 2, "past_seq", 16]
    assert config["quality"]["parity"] < 1e-4  # the export's own check
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())

    # Prefill, then decode steps of one token each: every position's logits against the model's plain forward
    # of the whole sequence.
    tokens = torch.randint(7, 500, (3, 12), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    torch.testing.assert_close(exported(tokens[:, :8]), full[:, :8], atol=1e-4, rtol=0)
    feeds = {"input_ids": tokens[:, :8].numpy(), "attention_mask": np.ones((3, 8), np.int64),
             "position_ids": np.tile(np.arange(8), (3, 1))}
    _, *past = exported.sessions[PREFILL].run(None, feeds)
    for position in range(8, 12):
        feeds = {"input_ids": tokens[:, position:position + 1].numpy(),
                 "attention_mask": np.ones((3, position + 1), np.int64), "position_ids": np.full((3, 1), position),
                 **dict(zip(cache_names("past", 2), past, strict=True))}
        logits, *past = exported.sessions[DECODE].run(None, feeds)
        torch.testing.assert_close(torch.from_numpy(logits[:, 0]), full[:, position], atol=1e-4, rtol=0)
    # The decode graph with an empty past is the prefill graph, to the bit: OnnxModel runs it alone.
    feeds = {"input_ids": tokens[:, :8].numpy(), "attention_mask": np.ones((3, 8), np.int64),
             "position_ids": np.tile(np.arange(8), (3, 1))}
    for ours, theirs in zip(exported.sessions[PREFILL].run(None, feeds),
                            exported.sessions[DECODE].run(None, {**feeds, **exported.no_past(3)}), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert list(OnnxModel(folder).sessions) == [DECODE]

    # Left-padded prompts of different lengths, greedy, stopping on eos: the same tokens as PyTorch.
    prompts = [[0, 11, 12, 13, 14, 15, 16], [0, 40], [0, 99, 98, 97]]
    ours = generate(model, prompts, 24, stop_ids=(1,), pad_id=2)
    assert exported.generate(prompts, 24, stop_ids=(1,), pad_id=2) == ours
    assert exported.generate(prompts, 24, stop_ids=(1,), pad_id=2, temperature=0.9, top_k=20, seed=3) == generate(
        model, prompts, 24, stop_ids=(1,), pad_id=2, temperature=0.9, top_k=20, seed=3)

    # The CLI: --chat on the export prints what the checkpoint's generation prints.
    question = ["--chat", "--prompt", "What does os.path.join do?", "--temperature", "0", "--max-new-tokens", "16"]
    assert main(["generate", "--onnx", str(folder), *question]) == 0
    on_onnx = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(language_model[1]), *question]) == 0
    assert on_onnx == capsys.readouterr().out and on_onnx.startswith("--- user: What does")


def test_quantized_exports_are_smaller_and_stay_close(language_model, tmp_path):
    model, _, fp32 = language_model
    prompts = [[0, *range(20 + 7 * i, 30 + 7 * i)] for i in range(8)]
    reference = OnnxModel(fp32).generate(prompts, 16, pad_id=2)
    tokens = torch.randint(7, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    fp32_logits = OnnxModel(fp32)(tokens)
    # (method, fp32 size ÷ its size (under 4× and 8×: scales and the rotary tables), mean |Δ log-probability|)
    for method, smaller, drifts in (("int8", 2.5, 0.15), ("int4", 3.0, 0.5)):
        folder = tmp_path / method
        shutil.copytree(fp32, folder)
        quantize_folder(fp32, folder, (PREFILL, DECODE), method)
        assert sorted(p.name for p in folder.iterdir() if p.suffix in (".onnx", ".data", ".bin")) == [
            DECODE, PREFILL, WEIGHTS_FILE]  # the quantizers' own data files merged into one
        sizes = [folder_bytes(f, (PREFILL, DECODE)) for f in (fp32, folder)]
        assert sizes[0] / sizes[1] > smaller, (method, sizes)
        quantized = OnnxModel(folder)
        logits = quantized(tokens)
        # Close to fp32: the same next token at most positions, and log-probabilities near.
        agree = (logits.argmax(-1) == fp32_logits.argmax(-1)).float().mean()
        assert agree > 0.8, (method, agree)
        drift = (logits.log_softmax(-1) - fp32_logits.log_softmax(-1)).abs().mean()
        assert drift < drifts, (method, drift)
        outputs = quantized.generate(prompts, 16, pad_id=2)
        assert sum(a == b for a, b in zip(outputs, reference, strict=True)) >= 4, method


def test_reward_model_exports_as_a_scorer(plain_tokenizer, tmp_path, capsys):
    model = make_checkpoint(tmp_path / "rm", plain_tokenizer, head="score", seed=1)
    out = export(capsys, tmp_path / "rm", tmp_path / "rm-onnx")
    assert "score.onnx, fp32" in out and "max |Δscore|" in out
    exported = OnnxModel(tmp_path / "rm-onnx")
    tokenizer = load_tokenizer(plain_tokenizer)
    conversations = [[{"role": "user", "content": "What does len do?"}, {"role": "assistant", "content": reply}]
                     for reply in ("Return the number of items.", "No.", "Return the length of an object, a "
                                   "sequence or a collection.")]
    ours = score_conversations(model, tokenizer, conversations)
    assert score_conversations(exported, tokenizer, conversations) == pytest.approx(ours, abs=1e-4)
    # The graph's own per-row score, read at each right-padded row's last real token.
    pad = tokenizer.special["pad"]
    rows = [[0, 4, 30, 31, 5, 40, 1], [0, 4, 30, 5, 41, 1, pad, pad]]
    tokens = np.array([r + [pad] * (8 - len(r)) for r in rows])
    scores = exported.scores(tokens, (tokens != pad).astype(np.int64))
    with torch.no_grad():
        expected = [model(torch.tensor([r]))[0, -1, 0].item() for r in [rows[0], rows[1][:6]]]
    assert scores.tolist() == pytest.approx(expected, abs=1e-4)
    assert main(["score", "--onnx", str(tmp_path / "rm-onnx"), "--prompt", "What does len do?",
                 "--response", "Return the number of items."]) == 0
    assert float(capsys.readouterr().out.split()[0]) == pytest.approx(ours[0], abs=2e-4)


@pytest.mark.slow
@torch.no_grad()
def test_an_export_past_2_gib_round_trips(plain_tokenizer, tmp_path, monkeypatch):
    """A 0.54 B-parameter model, 2.18 GB in fp32 (past the 2 GiB one protobuf holds; wide and 2 layers deep, as
    exporting costs per layer and the 2 GiB limit counts bytes): its graphs keep their
    weights in weights.bin, once for both; onnxruntime's greedy tokens are PyTorch's on 4 prompts, and the int8
    folder is under 0.35× the fp32 one. The export measures its speed on 1 prompt × 4 tokens here (16 × 32 of a
    model this size take minutes on a CPU)."""
    monkeypatch.setattr(commands, "PROMPTS", 1)
    monkeypatch.setattr(commands, "NEW_TOKENS", 4)
    config = TransformerConfig(vocab_size=32768, d_model=3584, n_layers=2, n_heads=28, n_kv_heads=28, max_seq_len=64)
    with torch.device("meta"):  # no default init to overwrite
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.reset_rotary(torch.device("cpu"))
    model.init_weights(0)
    model.eval()
    weights = 4 * model.num_params()
    assert weights > 2**31
    pad = load_tokenizer(plain_tokenizer).special["pad"]
    prompts = [[0, 11, 12, 13, 14, 15, 16], [0, 40], [0, 99, 98, 97], [0, 300, 301, 7, 8]]
    expected = generate(model, prompts, 8, pad_id=pad)
    # How far each greedy token leads the runner-up: past the graphs' logit error, rounding breaks no tie.
    margin = min(model(torch.tensor([prompt + new]))[0, len(prompt) - 1:-1].topk(2).values.diff().neg().min().item()
                 for prompt, new in zip(prompts, expected, strict=True))
    save_model(tmp_path / "ckpt", model, {"step": 0, "objective": "sft", "seed": 0, "mask_fraction": 0.15,
                                          "tokenizer": {"path": str(plain_tokenizer),
                                                        "sha256": tokenizer_hash(plain_tokenizer)}})
    del model
    try:
        fp32 = export_onnx(str(tmp_path / "ckpt"), str(tmp_path / "fp32"))
        # The weights once (the 5 norm scales, all ones, once in all; a few KB of alignment), not once per graph.
        assert weights * 0.999 < (tmp_path / "fp32" / WEIGHTS_FILE).stat().st_size < weights * 1.001
        assert fp32["bytes"] < weights * 1.001 and margin > 10 * fp32["parity"], (margin, fp32["parity"])
        assert OnnxModel(tmp_path / "fp32").generate(prompts, 8, pad_id=pad) == expected
        int8 = export_onnx(str(tmp_path / "ckpt"), str(tmp_path / "int8"), quantization="int8")
        assert int8["bytes"] < 0.35 * fp32["bytes"], (int8["bytes"], fp32["bytes"])
        assert int8["prompts"] == 1 and int8["onnx_tokens_per_s"] > 0  # it loaded and generated
    finally:  # 6 GB the suite need not keep
        for name in ("ckpt", "fp32", "int8"):
            shutil.rmtree(tmp_path / name, ignore_errors=True)


@pytest.mark.ray
def test_bad_input_is_refused_in_one_line(language_model, tiny_prefs_dataset, tmp_path, capsys):
    _, checkpoint, folder = language_model
    out = tmp_path / "out"
    cases = [
        (["export", "onnx", str(tmp_path), "--out", str(out)], "neither a checkpoint nor a run folder"),
        (["export", "onnx", str(checkpoint), "--out", str(out), "--quantize", "int3"],
         "unknown --quantize 'int3'; choose one of none, int8, int4"),
        # Data that does not suit the model is refused before anything is exported.
        (["export", "onnx", str(checkpoint), "--out", str(out), "--data", str(tiny_prefs_dataset)],
         "holds prefs data"),
        (["generate", "--onnx", str(tmp_path / "none"), "--prompt", "x"], "does not exist"),
        (["generate", "--onnx", str(checkpoint), "--prompt", "x"], f"is not an ONNX export (no {CONFIG_FILE})"),
        (["generate", "--onnx", str(folder), "--prompt", "word " * 60], "longer than the 48 the model was exported"),
        (["generate", "--onnx", str(folder), "--prompt", "word", "--max-new-tokens", "60"],
         "the prompt + 60 new tokens is"),
        (["export", "onnx", str(checkpoint), "--out", str(folder)], "already holds a finished result"),
    ]
    for argv, fragment in cases:
        assert_one_line_error(main(argv), capsys.readouterr().err, fragment)
    assert not out.exists() and not list(tmp_path.glob(".out*"))

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / DECODE).unlink()
    (broken / WEIGHTS_FILE).unlink()
    assert_one_line_error(main(["generate", "--onnx", str(broken), "--prompt", "x"]), capsys.readouterr().err,
                          "lacks decode.onnx, weights.bin")
    config = json.loads((folder / CONFIG_FILE).read_text())
    (broken / CONFIG_FILE).write_text(json.dumps({**config, "format": "raytrain.onnx/0"}))
    assert_one_line_error(main(["eval", "--onnx", str(broken), "--data", "x"]), capsys.readouterr().err,
                          "exported in format 'raytrain.onnx/0'", "export it again")


@pytest.mark.ray
def test_int8_export_of_a_trained_run_measures_what_it_lost(reference, tiny_dataset, tmp_path, capsys):
    """The export's report and `raytrain eval --onnx` agree, and the fp32 model's numbers are PyTorch's."""
    from raytrain.commands import evaluate

    run_dir, _ = reference
    out = export(capsys, run_dir, tmp_path / "int8", "--quantize", "int8", "--data", str(tiny_dataset),
                 "--batches", "2", "--batch-size", "8")
    quality = json.loads((tmp_path / "int8" / CONFIG_FILE).read_text())["quality"]
    assert "int8" in out and "smaller" in out and "held-out perplexity PyTorch fp32" in out, out
    torch_ppl = evaluate(Namespace(checkpoint=str(run_dir), onnx=None, data=str(tiny_dataset), batches=2,
                                   batch_size=8))["val/ppl"]
    onnx_ppl = evaluate(Namespace(checkpoint=None, onnx=str(tmp_path / "int8"), data=str(tiny_dataset), batches=2,
                                  batch_size=8))["val/ppl"]
    assert quality["fp32"] == pytest.approx(torch_ppl, rel=1e-6)
    assert quality["exported"] == pytest.approx(onnx_ppl, rel=1e-6)
    assert abs(onnx_ppl / torch_ppl - 1) < 0.03
    # d_model 32: the graph and the scales weigh as much as the weights, so well under 4× smaller
    assert quality["bytes"] * 1.5 < quality["fp32_bytes"] and quality["agreement"] > 0.5
    assert quality["torch_tokens_per_s"] > 0 and quality["onnx_tokens_per_s"] > 0


def test_a_checkpoint_whose_data_has_no_val_rows_exports_and_says_the_check_was_skipped(
        tiny_dataset, tiny_tokenizer, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"] = []  # as a corpus too small for data.prepare.val_fraction leaves it
    (data / "manifest.json").write_text(json.dumps(manifest))
    make_checkpoint(tmp_path / "ckpt", tiny_tokenizer)
    meta = json.loads((tmp_path / "ckpt" / "raytrain.json").read_text())
    (tmp_path / "ckpt" / "raytrain.json").write_text(json.dumps({**meta, "data": str(data)}))
    out = export(capsys, tmp_path / "ckpt", tmp_path / "onnx")
    assert f"quality check on held-out data skipped: the checkpoint's data '{data}' has no held-out (val) rows" \
        in out and "pass --data DIR" in out and (tmp_path / "onnx" / CONFIG_FILE).is_file()
    # Given explicitly, such data is refused before anything is written.
    assert_one_line_error(main(["export", "onnx", str(tmp_path / "ckpt"), "--out", str(tmp_path / "no"), "--data",
                                str(data)]), capsys.readouterr().err, "has no held-out (val) rows")
    assert not (tmp_path / "no").exists()
