"""The CLI handlers of `raytrain eval`, `generate`, `score`, `export onnx`, `convert` and `plan`: each reads its
arguments, loads what they name (a checkpoint in torch, or an export on onnxruntime with --onnx) and calls the
library (inference.py, export/, model/hf.py, parallel/plan.py); no logic of their own."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from raytrain import storage
from raytrain.data.manifest import PreparedDataset
from raytrain.data.tokenizer import load_tokenizer
from raytrain.errors import DataError
from raytrain.inference import generate_texts, print_generations, score_conversations, validation_metrics
from raytrain.train.checkpoint import checkpoint_tokenizer, load_model, model_head, resolve_checkpoint, save_model
from raytrain.train.hf_checkpoint import hf_model_on_meta


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    """`raytrain eval`: a checkpoint's held-out metrics in torch, or an export's on onnxruntime (--onnx)."""
    if getattr(args, "task", None):
        return evaluate_task(args)
    onnx = onnx_folder(args)
    model, meta = load_exported(onnx) if onnx else load_model(args.checkpoint)
    dataset = PreparedDataset.open(args.data)
    result, count = validation_metrics(model, meta, dataset, args.batches, args.batch_size)
    if model_head(meta) == "score":
        print(f"step {meta['step']}: pairwise accuracy {result['val/accuracy']:.3f}  val/loss "
              f"{result['val/loss']:.4f}  margin {result['val/margin']:.3f}  ({count} ranked pairs of "
              f"{args.data})")
    else:
        what = "answer tokens" if dataset.kind == "sft" else "tokens"
        print(f"step {meta['step']}: val/loss {result['val/loss']:.4f}  val/ppl {result['val/ppl']:.2f}  "
              f"({count} {what} of {args.data})")
    return result


def evaluate_task(args: argparse.Namespace) -> dict[str, float]:
    """`raytrain eval --task`: exact-match accuracy on the task's held-out problems, greedy and sampled, by level."""
    from raytrain.tasks import load_task
    from raytrain.tasks.evaluate import print_accuracy, task_accuracy

    task = load_task(args.task)
    model, meta, tokenizer = model_and_tokenizer(args, "lm")
    chat = meta.get("stage") != "pretrain"  # a pre-trained model continues the problem's line instead
    result = task_accuracy(model, tokenizer, task, chat=chat, problems=args.problems, samples=args.samples,
                           temperature=args.temperature, seed=args.seed)
    print(f"step {meta['step']}: {task.name} held-out exact-match accuracy ({result['problems']} problems; "
          f"{'chat' if chat else 'text continuation'}; a correct reply is {task.answer_format})")
    print_accuracy(result, task.levels, args.samples)
    return result


def onnx_folder(args: argparse.Namespace) -> str | None:
    """--onnx DIR (tests that build args themselves may leave it out)."""
    return getattr(args, "onnx", None)


def load_exported(folder: str):
    """(an ONNX export on onnxruntime, the checkpoint meta it was exported from)."""
    from raytrain.export.runtime import OnnxModel

    model = OnnxModel(folder)
    return model, model.meta


# Why a command refuses a checkpoint whose model has another head than it needs.
WRONG_HEAD = {
    "lm": "'{}' is a reward model: it scores text rather than writing it; use `raytrain score`, or generate "
          "with the SFT model it started from",
    "score": "'{}' is a language model; score with a reward model from `raytrain reward`",
}


def model_and_tokenizer(args: argparse.Namespace, head: str):
    """(model, meta, tokenizer) of args.checkpoint, or of the export args.onnx on onnxruntime; the model must
    have `head`."""
    onnx = onnx_folder(args)
    model, meta = load_exported(onnx) if onnx else load_model(args.checkpoint)
    if model_head(meta) != head:
        raise DataError(WRONG_HEAD[head].format(onnx or args.checkpoint))
    # An export carries its tokenizer; a checkpoint names the one its data used.
    folder = onnx if onnx and not args.tokenizer else checkpoint_tokenizer(meta, args.tokenizer)
    return model, meta, load_tokenizer(folder)


def generate(args: argparse.Namespace) -> list[str]:
    model, _, tokenizer = model_and_tokenizer(args, "lm")
    texts = generate_texts(model, tokenizer, args.prompt, chat=args.chat, system=args.system,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed)
    print_generations(args.prompt, texts, args.chat)
    return texts


def score(args: argparse.Namespace) -> list[float]:
    """A reward model's score of each response to one prompt, raw and normalised by its training-set stats."""
    model, meta, tokenizer = model_and_tokenizer(args, "score")
    prompt = [{"role": "system", "content": args.system}] if args.system else []
    prompt.append({"role": "user", "content": args.prompt})
    scores = score_conversations(model, tokenizer, [[*prompt, {"role": "assistant", "content": response}]
                                                    for response in args.response])
    stats = meta.get("reward")
    for response, value in zip(args.response, scores, strict=True):
        normalised = f"  (normalised {(value - stats['mean']) / stats['std']:+.3f})" if stats else ""
        print(f"{value:+.4f}{normalised}  {response}")
    return scores


def convert_to_hf(args: argparse.Namespace) -> None:
    from raytrain.export.hf import checkpoint_to_hf

    written = checkpoint_to_hf(args.checkpoint, args.out, merge=args.merge)
    print(f"{resolve_checkpoint(args.checkpoint)} → {args.out} ({written})")


def convert_from_hf(args: argparse.Namespace) -> None:
    """A Hugging Face folder as a raytrain checkpoint, a tensor at a time (the peak is one tensor, not the model):
    every tensor, shard and the tokenizer checked before anything is written, raytrain.json written last, and the
    folder removed again if the conversion fails midway."""
    storage.require_local(args.hf_dir, "the Hugging Face folder of convert from-hf", "download it first")
    storage.require_local(args.out, "--out of convert from-hf", "convert here, then upload the folder")
    from raytrain.config import load_config
    from raytrain.data.prepare import tokenizer_info
    from raytrain.data.tokenizer import TOKENIZER_FILE, copy_tokenizer

    source, out = Path(args.hf_dir), Path(args.out)
    if (out / "raytrain.json").exists():
        raise DataError(f"'{out}' already holds a checkpoint; choose another --out")
    model, meta, reader = hf_model_on_meta(source.absolute())
    meta.pop("tokenizer", None)  # the copy beside the checkpoint, below
    config = load_config("demo", [f"train.init_from={out.absolute()}"])
    tokenizer = None
    if (source / TOKENIZER_FILE).is_file():
        tokenizer = load_tokenizer(source)  # its template, pad and special tokens checked before anything is written
        if tokenizer.get_vocab_size() > model.config.vocab_size:
            raise DataError(f"{source}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's "
                            f"embedding {model.config.vocab_size}; they are not a pair")
    created = not out.exists()
    try:
        if tokenizer is not None:
            (out / "tokenizer").mkdir(parents=True, exist_ok=True)
            copy_tokenizer(source, out / "tokenizer")
            meta["tokenizer"] = tokenizer_info(str((out / "tokenizer").absolute()))
            config = config.with_values({"data.prepare.tokenizer": meta["tokenizer"]["path"]})
        # A starting config: the demo's settings with this model and its tokenizer (stages take the model from --init).
        out.mkdir(parents=True, exist_ok=True)
        config.with_values({"model": vars(model.config)}).save(out / "config.yaml")
        save_model(out, model, meta, reader)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    c = model.config
    print(f"{source} → {out}: {c.family}, {model.num_params():,} parameters, {c.n_layers} layers, d_model "
          f"{c.d_model}, rope {c.rope_scaling}, max_seq_len {c.max_seq_len}"
          + (f"; tokenizer → {out / 'tokenizer'}" if "tokenizer" in meta else "; no tokenizer.json beside it")
          + f"\nstart a run from it with --init {out} (config: --config {out / 'config.yaml'})")


def plan(args: argparse.Namespace) -> int:
    """`raytrain plan`: prints the plan; exits 1 when the layout does not fit, so a script can tell."""
    text, fits = plan_report(args)
    print(text)
    return 0 if fits else 1


def plan_report(args: argparse.Namespace) -> tuple[str, bool]:
    from raytrain.config import load_config
    from raytrain.parallel.plan import format_plan, layout_fits, plan_ranks
    from raytrain.stages import stage_of

    config = load_config(args.config, [*args.overrides, f"parallel.workers={args.world}"])
    seq_len = args.seq_len or config.model.max_seq_len
    stage_of(config.train.objective).check_layout(config, seq_len)
    plans = plan_ranks(config, args.world, seq_len)
    text = format_plan(config, args.world, seq_len, plans, args.gpu_memory, args.peak_tflops, args.mfu)
    return text, layout_fits(plans, args.gpu_memory)
