"""Batched generation with a KV cache: left-padded prompts, greedy or sampled, stop at any of the stop ids (eos, a
chat template's end of turn).

Sampling draws each prompt's tokens from its own generator, seeded `seed + i` for prompt i, so a prompt's
sample does not depend on which other prompts share its batch (rollout actors may batch them any way).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from raytrain.model.transformer import KVCache, Transformer


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generators: list[torch.Generator]) -> torch.Tensor:
    """logits [batch, vocab] → next token ids [batch], row i drawn with generators[i]; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop tokens once the mass before them already reaches top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # Inverse-CDF sampling: one uniform draw per row from its own generator (torch.multinomial draws
    # an exponential per vocabulary entry, a fifth of a small model's decode step on CPU).
    cdf = logits.softmax(-1).cumsum(-1)
    draws = torch.cat([torch.rand(1, generator=g, device=logits.device) for g in generators])
    # right: the first token whose cumulative mass exceeds the draw, never one of zero probability
    chosen = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return chosen.clamp(max=logits.shape[-1] - 1)


# step(tokens [batch, n], positions [batch, n], real [batch, end], start) → logits [batch, vocab] of the last of
# the n new tokens, which fill columns start..end of the left-padded rows; real marks the columns that are not
# padding. The model keeps its own cache of the columns before `start`.
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    stop_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    seeds: list[int] | None = None,
    logprobs: list[list[float]] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (the stop token included when reached); prompt i is sampled with seeds[i], by default
    seed + i. A `logprobs` list gets each new token's log-probability under the model (its raw logits, before
    temperature or top-k/p: what the learner computes), one list per prompt."""
    device = next(model.parameters()).device
    total = max(len(p) for p in prompts) + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt + new tokens exceed model.max_seq_len {model.config.max_seq_len}")
    cache = KVCache(model.config, len(prompts), total, device, next(model.parameters()).dtype)
    index = torch.arange(total, device=device)
    causal = index[None, :] <= index[:, None]
    eye = torch.eye(total, dtype=torch.bool, device=device)

    def step(tokens, positions, real, start):
        end = start + tokens.shape[1]
        # causal, minus the padding; a pad query sees itself only, so no row is all -inf
        mask = (causal[start:end, :end][None] & real[:, None, :]) | eye[start:end, :end][None]
        return model(tokens, positions=positions, mask=mask[:, None], cache=cache, last_only=True)[:, -1]

    seeds = seeds if seeds is not None else [seed + i for i in range(len(prompts))]
    return decode(step, prompts, max_new_tokens, stop_ids=stop_ids, pad_id=pad_id, temperature=temperature,
                  top_k=top_k, top_p=top_p, seeds=seeds, device=device, logprobs=logprobs)


def decode(step: Step, prompts: list[list[int]], max_new_tokens: int, *, stop_ids: tuple[int, ...], pad_id: int,
           temperature: float, top_k: int, top_p: float, seeds: list[int], device=None,
           logprobs: list[list[float]] | None = None) -> list[list[int]]:
    """The generation loop around any model's `step` (ours in torch, an exported one on onnxruntime): left-pad
    the prompts, prefill, then one token per step until max_new_tokens or every row's stop token."""
    batch, longest = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((batch, longest), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((batch, longest + max_new_tokens), dtype=torch.bool, device=device)
    for i, prompt in enumerate(prompts):  # left padding: every prompt ends at the same column
        tokens[i, longest - len(prompt) :] = torch.tensor(prompt, device=device)
        real[i, longest - len(prompt) :] = True
    real[:, longest:] = True  # generated tokens
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    chosen_logp = torch.zeros((batch, max_new_tokens), device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    stops = torch.tensor(list(stop_ids), device=device) if stop_ids else None
    step_tokens, start, produced = tokens, 0, 0
    for produced in range(1, max_new_tokens + 1):
        end = start + step_tokens.shape[1]
        logits = step(step_tokens, positions[:, start:end], real[:, :end], start)
        next_ids = sample_next(logits, temperature, top_k, top_p, generators)
        next_ids = torch.where(done, torch.full_like(next_ids, pad_id), next_ids)
        out[:, produced - 1] = next_ids
        if logprobs is not None:
            chosen_logp[:, produced - 1] = torch.log_softmax(logits.float(), -1).gather(-1, next_ids[:, None])[:, 0]
        if stops is not None:
            done |= torch.isin(next_ids, stops)
            if done.all():
                break
        step_tokens, start = next_ids[:, None], end
    out = out[:, :produced]
    results = []
    for row, finished, row_logp in zip(out.tolist(), done.tolist(), chosen_logp.tolist(), strict=True):
        if finished:
            row = row[: next(i for i, t in enumerate(row) if t in stop_ids) + 1]
        results.append(row)
        if logprobs is not None:
            logprobs.append(row_logp[: len(row)])
    return results
