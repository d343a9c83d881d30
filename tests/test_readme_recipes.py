"""The README's three recipes run as written: each command line of their blocks, read from README.md, runs through
`raytrain`'s own entry point in a folder holding tiny inputs of the shapes the README describes (a folder of text, a
Hugging Face Qwen2 folder with a ChatML tokenizer, chats, preferences and prompts as JSONL, the reward file). Only
sizes shrink: overrides appended after each command (later overrides win) cut steps, batch and model size."""

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from conftest import records

from raytrain.cli import main
from raytrain.data.sources import stdlib_files
from raytrain.data.stdlib_qa import stdlib_prefs, stdlib_qa
from tests.families import save_family, save_tokenizer

README = Path(__file__).parent.parent / "README.md"
RECIPE = re.compile(r"<!-- recipe: (\S+)(?: (\S+))? -->\n```\w+\n(.*?)```", re.S)
FAST = ["train.log_every=1", "train.val_batches=1", "parallel.cpus_per_worker=1", "tracking.mode=disabled"]
TINY = {  # per command: what shrinks it
    "pretrain": ["train.steps=4", "train.global_batch=4", "train.val_every=2", "train.checkpoint_every=2",
                 "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", *FAST],
    "sft": ["train.steps=3", "train.global_batch=4", "train.val_every=3", "train.checkpoint_every=3", *FAST],
    "dpo": ["train.steps=3", "train.global_batch=4", "train.val_every=3", "train.checkpoint_every=3", *FAST],
    "ppo": ["ppo.iterations=2", "ppo.prompts_per_iteration=2", "ppo.samples_per_prompt=2", "ppo.max_new_tokens=8",
            "ppo.val_prompts=2", "ppo.minibatches=1", "train.val_every=2", "train.checkpoint_every=2", *FAST],
    "data sft": ["data.prepare.seq_len=128"],  # the tiny model's context
    "data prefs": ["data.prepare.seq_len=128"],
    "generate": ["--max-new-tokens", "8"],
}
HF_FOLDER = "path/to/Qwen2.5-0.5B-Instruct"


def recipes() -> dict[str, tuple[str | None, str]]:
    found = {name: (file, body) for name, file, body in RECIPE.findall(README.read_text())}
    assert {"pretrain", "open-model", "grpo", "grpo-file"} <= set(found), found.keys()
    return found


def make_inputs(folder: Path) -> None:
    """What a user brings, in the README's names."""
    (folder / "my-text").mkdir()
    for path in stdlib_files()[:40]:
        shutil.copy(path, folder / "my-text" / f"{Path(path).stem}.txt")
    hf_dir = folder / HF_FOLDER
    save_family("qwen2", hf_dir, tie_word_embeddings=True)
    save_tokenizer("chatml", hf_dir)
    pairs = stdlib_qa()[:48]
    write_jsonl(folder / "my-chats.jsonl", [{"messages": [{"role": "user", "content": p.question},
                                                          {"role": "assistant", "content": p.answer}]}
                                            for p in pairs])
    write_jsonl(folder / "my-prefs.jsonl", [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                                            for p in stdlib_prefs()[:48]])
    write_jsonl(folder / "my-prompts.jsonl", [{"prompt": p.question} for p in pairs[:8]])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def run_block(body: str) -> None:
    for line in body.strip().splitlines():
        words = shlex.split(line)
        assert words[0] == "raytrain", line
        command = " ".join(words[1:3]) if words[1] in ("data", "convert") else words[1]
        code = main([*words[1:], *TINY.get(command, [])])
        assert code in (0, None), f"README command failed ({code}): {line}"


@pytest.mark.ray
def test_the_readme_recipes_run_as_written(ray_session, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    found = recipes()
    make_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [*sys.path])  # raytrain adds the working folder to find my_reward.py

    run_block(found["pretrain"][1])
    assert records(tmp_path / "runs" / "my-model")[-1]["step"] == 4
    assert json.loads((tmp_path / "runs" / "my-data" / "manifest.json").read_text())["seq_len"] == 256

    run_block(found["open-model"][1])
    for run in ("my-sft", "my-dpo"):
        assert json.loads((tmp_path / "runs" / run / "summary.json").read_text())["steps"] == 3
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "my-dpo-hf")).__name__ == "Qwen2ForCausalLM"

    file, code = found["grpo-file"]
    (tmp_path / file).write_text(code)
    run_block(found["grpo"][1])
    samples = [json.loads(line) for line in (tmp_path / "runs" / "my-grpo" / "samples.jsonl").read_text().splitlines()]
    import my_reward  # the README's reward, found in the working folder; the actors got it by value

    assert samples and [s["reward"] for s in samples] == pytest.approx(
        my_reward.score([s["prompt"] for s in samples], [s["response"] for s in samples]))
