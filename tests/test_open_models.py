"""An open model with its own tokenizer through the chain: convert from-hf (model, tokenizer, a starting config),
SFT → DPO → GRPO on Ray with the tokenizer's chat template, generation stopping at its end of turn, and
convert to-hf back to a folder transformers loads."""

import argparse
import json

import pytest
import torch
from conftest import assert_same_curve, metric, records

from raytrain.commands import convert_from_hf, convert_to_hf
from raytrain.config import load_config
from raytrain.errors import DataError
from raytrain.train.checkpoint import read_checkpoint_meta, resolve_checkpoint
from tests.families import FAMILY_TOKENIZER, save_family, save_tokenizer


def imported(tmp_path, family="qwen2", **changes):
    """A random transformers model of the family with its style of tokenizer beside it, converted."""
    hf_dir = tmp_path / f"{family}-hf"
    hf = save_family(family, hf_dir, **changes)
    save_tokenizer(FAMILY_TOKENIZER[family], hf_dir)
    convert_from_hf(argparse.Namespace(hf_dir=str(hf_dir), out=str(tmp_path / "base")))
    return hf, tmp_path / "base"


def test_convert_keeps_the_tokenizer_and_writes_a_starting_config(tmp_path):
    _, base = imported(tmp_path)
    meta = read_checkpoint_meta(base)
    assert meta["model"]["family"] == "qwen2" and meta["tokenizer"]["path"] == str((base / "tokenizer").absolute())
    assert meta["tokenizer"]["special_tokens"]["eos"] == meta["tokenizer"]["special_tokens"]["stop"][0]
    config = load_config(str(base / "config.yaml"))
    assert vars(config.model) == meta["model"] and config.train.init_from == str(base.absolute())
    assert config.data.prepare.tokenizer == meta["tokenizer"]["path"]
    # A tokenizer larger than the model's embedding is not its pair.
    other = tmp_path / "mismatch"
    save_family("llama", other)
    save_tokenizer("llama3", other, vocab_size=400)
    with pytest.raises(DataError, match="the tokenizer has 400 tokens but the model's embedding 320"):
        convert_from_hf(argparse.Namespace(hf_dir=str(other), out=str(tmp_path / "no")))
    assert not (tmp_path / "no").exists()


@pytest.mark.ray
def test_sft_dpo_grpo_on_an_imported_qwen2_with_its_chat_template(ray_session, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raytrain.data.chat_data import run_prefs_data_stage, run_sft_data_stage
    from raytrain.data.manifest import PreparedDataset
    from raytrain.data.tokenizer import load_tokenizer
    from raytrain.inference import generate_from_checkpoint
    from raytrain.stages import STAGES

    hf, base = imported(tmp_path, tie_word_embeddings=False)  # as Qwen2.5-7B (a pipeline cannot split a tied head)
    tokenizer = str(base / "tokenizer")
    vocab = load_tokenizer(tokenizer)
    data = {}
    for kind, builtin, run in (("sft", "stdlib-qa", run_sft_data_stage),
                               ("prefs", "stdlib-prefs", run_prefs_data_stage)):
        data[kind] = tmp_path / f"{kind}-data"
        run(load_config("tiny", [f"data.source.inputs=[{builtin}]", "data.prepare.seq_len=128",
                                 f"data.prepare.tokenizer='{tokenizer}'", f"data.prepare.out='{data[kind]}'"]))
    sft_data = PreparedDataset.open(data["sft"])
    assert sft_data.manifest["tokenizer"]["special_tokens"]["pad"] == vocab.pad == vocab.token_to_id("<|endoftext|>")
    assert PreparedDataset.open(data["prefs"]).columns[-1].startswith("reply_mask_")

    common = [f"run.root='{tmp_path}'", "parallel.workers=1", "train.log_every=1", "train.warmup_steps=0",
              "train.val_every=0", "train.checkpoint_every=10"]

    def fine_tune(stage, name, init, dataset, *overrides):
        # --config tiny: its model section differs from the import; the stage takes the checkpoint's
        config = load_config("tiny", [*common, f"run.name={name}", f"train.init_from='{init}'",
                                      f"train.data='{dataset}'", *overrides])
        return STAGES[stage].run(config)

    sft = ["train.steps=20", "train.lr=3e-3", "train.global_batch=8", "train.micro_batches=2"]
    fine_tune("sft", "sft", base, data["sft"], *sft)
    sft_loss = metric(tmp_path / "sft", "train/loss")
    # The family's biases and yarn positions under a pipeline: 2 stages of one layer, the same curve, started from
    # the Hugging Face folder itself (each stage reads the slices it holds) rather than the converted checkpoint.
    fine_tune("sft", "sft-pp2", f"hf:{tmp_path / 'qwen2-hf'}", data["sft"], *sft, "parallel.workers=2",
              "parallel.pp=2")
    assert_same_curve(metric(tmp_path / "sft-pp2", "train/loss"), sft_loss)
    assert sum(list(sft_loss.values())[-3:]) < sum(list(sft_loss.values())[:3]) - 0.3, sft_loss
    assert read_checkpoint_meta(resolve_checkpoint(tmp_path / "sft"))["model"] == read_checkpoint_meta(base)["model"]

    fine_tune("dpo", "dpo", tmp_path / "sft", data["prefs"], "train.steps=10", "train.lr=3e-3",
              "train.global_batch=8", "train.dpo_beta=0.5")
    dpo_loss = metric(tmp_path / "dpo", "train/loss")
    assert abs(dpo_loss[1] - 0.6931) < 1e-3  # the policy is its own reference at the start
    assert min(list(dpo_loss.values())[-3:]) < 0.69, dpo_loss

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What does {w} do?"}) + "\n"
                               for w in ("len", "sorted", "zip", "map", "open", "print", "range", "sum")))
    grpo = load_config("tiny", [*common, "run.name=grpo", f"ppo.policy='{tmp_path / 'dpo'}'",
                                f"ppo.prompts='{prompts}'", "ppo.algorithm=grpo", "ppo.samples_per_prompt=4",
                                "ppo.prompts_per_iteration=4", "ppo.iterations=4", "ppo.max_new_tokens=16",
                                "ppo.val_prompts=4", "ppo.reward=python:raytrain.rlhf.rewards:brevity",
                                "train.lr=1e-2", "train.min_lr_ratio=1", "train.checkpoint_every=2"])
    STAGES["ppo"].run(grpo)
    assert len(metric(tmp_path / "grpo", "ppo/reward_mean")) == 4
    samples = [json.loads(line) for line in (tmp_path / "grpo" / "samples.jsonl").read_text().splitlines()]
    assert samples and not any("<|im_start|>" in s["response"] for s in samples)
    assert records(tmp_path / "grpo")[-1]["step"] > 0

    # Generation from the checkpoint stops at the template's end of turn; to-hf gives transformers' own classes.
    ids = vocab.encode_prompt("What does len do?")
    from raytrain.train.checkpoint import load_model

    model, _ = load_model(str(tmp_path / "grpo"))
    from raytrain.model.generate import generate

    out = generate(model, [ids], 24, stop_ids=vocab.stop_ids, pad_id=vocab.pad)[0]
    assert out[-1] in vocab.stop_ids or len(out) == 24
    assert len(generate_from_checkpoint(str(tmp_path / "grpo"), ["What does len do?"], chat=True,
                                        max_new_tokens=8, temperature=0.0)) == 1
    convert_to_hf(argparse.Namespace(checkpoint=str(tmp_path / "grpo"), out=str(tmp_path / "grpo-hf"), merge=False))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "grpo-hf", dtype=torch.float32).eval()
    assert type(back) is type(hf)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "grpo-hf"))
    assert theirs.eos_token == "<|im_end|>" and back.config.pad_token_id == vocab.pad
    tokens = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, model.eval()(tokens), atol=1e-5, rtol=0)


def test_an_imported_qwen3_exports_to_onnx_with_its_tokenizer(tmp_path, capsys):
    """q/k norms and a head size apart from d_model / heads through the ONNX graphs; the export keeps the chat
    template, and --chat generates the same text on onnxruntime as from the checkpoint, stopping at <|im_end|>."""
    from raytrain.cli import main
    from raytrain.export.folder import CONFIG_FILE

    _, base = imported(tmp_path, "qwen3")
    assert main(["export", "onnx", str(base), "--out", str(tmp_path / "onnx")]) == 0
    exported = json.loads((tmp_path / "onnx" / CONFIG_FILE).read_text())
    assert exported["quality"]["parity"] < 1e-4 and exported["model"]["qk_norm"]
    assert (tmp_path / "onnx" / "tokenizer_config.json").read_text() == \
        (base / "tokenizer" / "tokenizer_config.json").read_text()
    capsys.readouterr()
    question = ["--chat", "--prompt", "What does len do?", "--temperature", "0", "--max-new-tokens", "12"]
    assert main(["generate", "--onnx", str(tmp_path / "onnx"), *question]) == 0
    on_onnx = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(base), *question]) == 0
    assert on_onnx == capsys.readouterr().out and on_onnx.startswith("--- user: What does len do?")
