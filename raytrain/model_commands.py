"""`raytrain eval`, `generate`, `convert` and `plan`: single-process work on a checkpoint or a config."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

from raytrain import storage
from raytrain.config import RuntimeConfig, TrainConfig
from raytrain.data.chat import encode_conversation, encode_prompt
from raytrain.data.manifest import PreparedDataset
from raytrain.data.tokenizer import TOKENIZER_FILE, copy_tokenizer, load_tokenizer, special_token_ids
from raytrain.errors import DataError
from raytrain.evaluate import forward_loss_sums, split_sums
from raytrain.model.generate import generate as generate_tokens
from raytrain.model.hf import load_hf, save_hf
from raytrain.runtime import init_ray
from raytrain.train.checkpoint import load_model, model_head, resolve_checkpoint, save_model
from raytrain.train.objectives import build_objective, final_positions, response_scores


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    """`raytrain eval`: a checkpoint's held-out metrics in torch, or an export's on onnxruntime (--onnx)."""
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


def validation_metrics(model, meta: dict, dataset: PreparedDataset, batches: int, batch_size: int
                       ) -> tuple[dict[str, float], int]:
    """(held-out metrics, tokens or pairs counted) of a model (torch, or an export on onnxruntime) on the first
    `batches` validation batches of a dataset, checked to suit the model."""
    check_evaluation_data(meta, dataset)
    reward = model_head(meta) == "score"
    init_ray(RuntimeConfig(progress=False))
    # Fine-tuning data is scored on its answer tokens whatever the model's stage (the answer loss before SFT
    # is the baseline); text data with the pre-training objective (next token, or masked for a masked LM).
    kind = "reward" if reward else "sft" if dataset.kind == "sft" else (
        meta["objective"] if meta["objective"] in ("causal", "masked") else "causal")
    objective = build_objective(kind, seed=meta["seed"], global_batch=batch_size,
                                mask_fraction=meta["mask_fraction"],
                                special=dataset.manifest["tokenizer"]["special_tokens"], multiple=1)
    totals = split_sums(dataset, objective, forward_loss_sums(model, objective), batches=batches,
                        global_batch=batch_size, consumer=0, num_consumers=1, device=torch.device("cpu"))
    return objective.metrics(totals, "val"), int(totals[1])


def check_evaluation_data(meta: dict, dataset: PreparedDataset) -> None:
    """A checkpoint is evaluated on data of its kind, tokenized with its tokenizer."""
    reward = model_head(meta) == "score"
    if reward != (dataset.kind == "prefs"):
        wanted = "`raytrain data prefs`" if reward else "`raytrain data prepare` or `raytrain data sft`"
        raise DataError(f"'{dataset.root}' holds {dataset.kind} data; a {'reward' if reward else 'language'} "
                        f"model is evaluated on {wanted} output")
    if dataset.manifest["tokenizer"]["sha256"] != meta["tokenizer"]["sha256"]:
        raise DataError(f"'{dataset.root}' was tokenized differently from the checkpoint's training data; "
                        "evaluate on data prepared with the same tokenizer")


def onnx_folder(args: argparse.Namespace) -> str | None:
    """--onnx DIR; callers that build args themselves (the demo, tests) may leave it out."""
    return getattr(args, "onnx", None)


def load_exported(folder: str):
    """(an ONNX export on onnxruntime, the checkpoint meta it was exported from)."""
    from raytrain.export.runtime import OnnxModel

    model = OnnxModel(folder)
    return model, model.meta


def checkpoint_tokenizer(meta: dict, override: str | None) -> str:
    """The tokenizer folder (or URI) a checkpoint's data used, or --tokenizer."""
    folder = override or meta["tokenizer"]["path"]
    if not storage.is_file(storage.join(folder, TOKENIZER_FILE)):
        raise DataError(f"tokenizer '{folder}' not found; pass --tokenizer DIR")
    return folder


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
    special = special_token_ids(tokenizer)
    if args.chat:  # each prompt is a user turn; the model answers as the assistant
        prompts = [encode_prompt(tokenizer, p, args.system) for p in args.prompt]
    else:
        prompts = [[special["bos"], *tokenizer.encode(p).ids] for p in args.prompt]
    run = model.generate if onnx_folder(args) else functools.partial(generate_tokens, model)
    outputs = run(prompts, args.max_new_tokens, eos_id=special["eos"], pad_id=special["pad"],
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    texts = [tokenizer.decode(out, skip_special_tokens=True) for out in outputs]
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(f"--- user: {prompt}\nassistant: {text}" if args.chat else f"--- {prompt!r}\n{prompt}{text}")
    return texts


@torch.no_grad()
def score_conversations(model, tokenizer, conversations: list[list[dict[str, str]]]) -> list[float]:
    """A reward model's score of each conversation (its last turn the reply scored), tokenized as the training
    rows were: in the chat format, cut from the left when longer than the model's context."""
    pad = special_token_ids(tokenizer)["pad"]
    rows = [encode_conversation(tokenizer, turns)[0][-model.config.max_seq_len:] for turns in conversations]
    tokens = torch.full((len(rows), max(map(len, rows))), pad)
    for i, ids in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids)
    return response_scores(model(tokens), final_positions(tokens, pad)).tolist()


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
    storage.require_local(args.out, "--out of convert to-hf", "convert here, then upload the folder")
    model, meta = load_model(args.checkpoint)
    out = Path(args.out)
    save_hf(model, out)
    tokenizer_dir = meta["tokenizer"]["path"] if "tokenizer" in meta else None  # a folder or a URI
    if tokenizer_dir and storage.is_file(storage.join(tokenizer_dir, TOKENIZER_FILE)):
        copy_tokenizer(tokenizer_dir, out)  # model and tokenizer in one folder: AutoModel and AutoTokenizer load it
    architecture = "LlamaForSequenceClassification, 1 label" if model.score is not None else "LlamaForCausalLM"
    print(f"{resolve_checkpoint(args.checkpoint)} → {out} ({architecture}, safetensors)")


def convert_from_hf(args: argparse.Namespace) -> None:
    storage.require_local(args.hf_dir, "the Hugging Face folder of convert from-hf", "download it first")
    storage.require_local(args.out, "--out of convert from-hf", "convert here, then upload the folder")
    model = load_hf(Path(args.hf_dir))
    out = Path(args.out)
    if (out / "raytrain.json").exists():
        raise DataError(f"'{out}' already holds a checkpoint; choose another --out")
    save_model(out, model, {"step": 0, "objective": "causal", "mask_fraction": TrainConfig.mask_fraction, "seed": 0,
                            "source": str(args.hf_dir)})
    print(f"{args.hf_dir} → {out} ({model.num_params():,} parameters); start a run from it with "
          f"train.init_from={out}")


def plan(args: argparse.Namespace) -> str:
    from raytrain.config import load_config
    from raytrain.parallel.plan import format_plan, plan_ranks
    from raytrain.train.launch import check_layout

    config = load_config(args.config, [*args.overrides, f"parallel.workers={args.world}"])
    seq_len = args.seq_len or config.model.max_seq_len
    check_layout(config, seq_len)
    text = format_plan(config, args.world, seq_len, plan_ranks(config, args.world, seq_len), args.gpu_memory,
                       args.peak_tflops, args.mfu)
    print(text)
    return text
