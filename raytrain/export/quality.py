"""What an export keeps of its model: logit parity of the fp32 graphs, greedy agreement and speed."""

from __future__ import annotations

import time

import numpy as np
import torch

from raytrain.data.manifest import PreparedDataset
from raytrain.data.stream import read_rows
from raytrain.export.graphs import DECODE, PREFILL, LanguageModelStep, cache_names
from raytrain.export.runtime import OnnxModel
from raytrain.model.generate import generate
from raytrain.model.transformer import Transformer

PROMPT_TOKENS = 32  # a text row's prompt: its first tokens
NEW_TOKENS = 32


@torch.no_grad()
def parity_error(model: Transformer, exported: OnnxModel, rows: list[list[int]], pad_id: int, steps: int = 3
                 ) -> float:
    """The largest |logit difference| between the model and its fp32 graphs over a left-padded batch: the
    prefill, then `steps` decode steps on the model's greedy tokens. The prefill runs on prefill.onnx where
    `exported` has a session on it, else on decode.onnx with an empty past (as OnnxModel runs it)."""
    reference = LanguageModelStep(model).eval()
    longest = max(map(len, rows))
    tokens = torch.tensor([[pad_id] * (longest - len(r)) + r for r in rows])
    mask = (torch.arange(longest)[None] >= torch.tensor([longest - len(r) for r in rows])[:, None]).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    past_torch, past_onnx, error = None, None, 0.0
    for step in range(steps + 1):
        logits, *present = reference(tokens, mask, positions, past_torch)
        feeds = {"input_ids": tokens.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
        prefill = not step and PREFILL in exported.sessions
        if step:
            feeds.update(zip(cache_names("past", model.config.n_layers), past_onnx, strict=True))
        elif not prefill:
            feeds.update(exported.no_past(len(rows)))
        onnx_logits, *past_onnx = exported.sessions[PREFILL if prefill else DECODE].run(None, feeds)
        real = mask[:, -tokens.shape[1]:].bool()
        error = max(error, float((logits - torch.from_numpy(onnx_logits)).abs()[real].max()))
        past_torch = present
        tokens = logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
        positions = positions[:, -1:] + 1
    return error


@torch.no_grad()
def score_parity_error(model: Transformer, exported: OnnxModel, rows: list[list[int]], pad_id: int) -> float:
    """The largest |score difference| between a reward model and its fp32 graph over right-padded rows: every
    position's score, and each row's score at its last real token."""
    longest = max(map(len, rows))
    tokens = torch.tensor([r + [pad_id] * (longest - len(r)) for r in rows])
    per_position = model(tokens)[..., 0]
    final = per_position[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])]
    mask = (tokens != pad_id).long().numpy()
    onnx_final = exported.scores(tokens.numpy(), mask)
    onnx_per_position = exported(tokens)[..., 0]
    return max(float((final - torch.from_numpy(onnx_final)).abs().max()),
               float((per_position - onnx_per_position).abs().max()))


def validation_prompts(dataset: PreparedDataset, count: int, max_length: int) -> list[list[int]]:
    """The first `count` validation rows as prompts: a chat row up to its first answer token, a text row's
    first PROMPT_TOKENS tokens; each leaves room for NEW_TOKENS."""
    split = dataset.split("val")
    rows = read_rows(split, np.arange(min(count, split.num_rows)), dataset.row_len, dataset.columns)
    prompts = []
    for row in rows.tolist():
        if dataset.kind in ("sft", "kto"):
            tokens, answer = row[0], row[1]
        elif dataset.kind == "prefs":  # the best response, up to its reply where the rows mark it
            tokens, answer = row[0], row[len(row) // 2] if dataset.objective_options else []
        else:
            tokens, answer = row, []
        end = answer.index(1) if 1 in answer else PROMPT_TOKENS
        prompts.append(tokens[: min(end, max_length - NEW_TOKENS)])
    return prompts


def greedy_agreement(reference: list[list[int]], other: list[list[int]]) -> tuple[float, int]:
    """(share of the reference's tokens that the other reproduced before its first difference, how many
    continuations are identical)."""
    kept = total = identical = 0
    for ours, theirs in zip(reference, other, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours),
                                                                                                    len(theirs)))
        kept, total, identical = kept + same, total + len(ours), identical + (ours == theirs)
    return kept / max(total, 1), identical


def tokens_per_second(run, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """Greedy generation speed of run(prompts, new_tokens) with one prompt at a time, as a deployment serves a
    request (no early stop: every prompt makes new_tokens), after one warm-up call; and the tokens it made."""
    run(prompts[:1], 2)
    started = time.perf_counter()
    outputs = [run([prompt], new_tokens)[0] for prompt in prompts]
    return len(prompts) * new_tokens / (time.perf_counter() - started), outputs


def torch_runner(model: Transformer, pad_id: int):
    return lambda prompts, new: generate(model, prompts, new, pad_id=pad_id)


def onnx_runner(model: OnnxModel, pad_id: int):
    return lambda prompts, new: model.generate(prompts, new, pad_id=pad_id)
