"""What a trained model does outside its run, in this process: held-out metrics on prepared data, generation,
and a reward model's scores. A model is a torch checkpoint's `Transformer` or an ONNX export's `OnnxModel`
(export/runtime.py), which answer alike; the CLI handlers (commands.py), the demo, exports and tests call these.
"""

from __future__ import annotations

import functools

import torch

from raytrain.data.manifest import PreparedDataset
from raytrain.model.generate import generate as generate_tokens
from raytrain.stages import STAGES
from raytrain.train.checkpoint import load_model, model_head
from raytrain.train.evaluate import check_evaluation_data, forward_loss_sums, split_sums
from raytrain.train.objectives import final_positions, response_scores


def validation_metrics(model, meta: dict, dataset: PreparedDataset, batches: int, batch_size: int
                       ) -> tuple[dict[str, float], int]:
    """(held-out metrics, tokens or pairs counted) of a model on the first `batches` validation batches of a
    dataset (read in this process), checked to suit the model. The objective is that of the stage that trains on
    this data with this head: fine-tuning data is scored on its answer tokens whatever the model's stage (the
    answer loss before SFT is the baseline), text data with the pre-training objective the model was trained with
    (next token, or masked for a masked LM)."""
    check_evaluation_data(meta, dataset)
    stage = next(s for s in STAGES.values()
                 if s.head == model_head(meta) and getattr(s, "data_kind", None) == dataset.kind)
    name = meta["objective"] if meta["objective"] in stage.objectives else stage.objectives[0]
    config = stage_config(name, meta["seed"], batch_size, meta["mask_fraction"])
    objective = stage.make_objective(config, dataset.manifest["tokenizer"]["special_tokens"], 1,
                                     **dataset.objective_options)
    totals = split_sums(dataset, objective, forward_loss_sums(model, objective), batches=batches,
                        global_batch=batch_size, consumer=0, num_consumers=1, device=torch.device("cpu"),
                        ray_data=False)
    return objective.metrics(totals, "val"), int(totals[1])


def stage_config(objective: str, seed: int, global_batch: int, mask_fraction: float):
    """The config keys an objective is built from, for a model evaluated outside its run."""
    from raytrain.config import load_config

    return load_config(None, [f"train.objective={objective}", f"train.seed={seed}",
                              f"train.global_batch={global_batch}", f"train.mask_fraction={mask_fraction}"])


def generate_texts(model, tokenizer, prompts: list[str], *, chat: bool = False, system: str | None = None,
                   max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 50, top_p: float = 0.95,
                   seed: int = 0) -> list[str]:
    """Each prompt's continuation (chat: each prompt a user turn, answered as the assistant); prompt i samples
    with seed + i."""
    ids = [tokenizer.encode_prompt(p, system) if chat else tokenizer.text_prompt(p) for p in prompts]
    run = model.generate if hasattr(model, "generate") else functools.partial(generate_tokens, model)
    # A chat reply stops at the template's end of turn, text at eos.
    outputs = run(ids, max_new_tokens, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad, temperature=temperature,
                  top_k=top_k, top_p=top_p, seed=seed)
    return [tokenizer.decode(out, skip_special_tokens=True) for out in outputs]


def print_generations(prompts: list[str], texts: list[str], chat: bool) -> None:
    for prompt, text in zip(prompts, texts, strict=True):
        print(f"--- user: {prompt}\nassistant: {text}" if chat else f"--- {prompt!r}\n{prompt}{text}")


def generate_from_checkpoint(checkpoint: str, prompts: list[str], **settings) -> list[str]:
    """generate_texts with a checkpoint's model and its data's tokenizer, printed as `raytrain generate` does."""
    from raytrain.data.tokenizer import load_tokenizer
    from raytrain.train.checkpoint import checkpoint_tokenizer

    model, meta = load_model(checkpoint)
    texts = generate_texts(model, load_tokenizer(checkpoint_tokenizer(meta, None)), prompts, **settings)
    print_generations(prompts, texts, settings.get("chat", False))
    return texts


@torch.no_grad()
def score_conversations(model, tokenizer, conversations: list[list[dict[str, str]]]) -> list[float]:
    """A reward model's score of each conversation (its last turn the reply scored), tokenized as the training
    rows were: in the chat format, cut from the left when longer than the model's context."""
    pad = tokenizer.pad
    rows = [tokenizer.encode_conversation(turns)[0][-model.config.max_seq_len:] for turns in conversations]
    tokens = torch.full((len(rows), max(map(len, rows))), pad)
    for i, ids in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids)
    return response_scores(model(tokens), final_positions(tokens, pad)).tolist()
