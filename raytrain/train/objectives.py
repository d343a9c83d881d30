"""Training objectives: each turns a rank's rows into (inputs, targets), and outputs into a loss and its sums.

causal: next token; masked: masked LM; sft: next token on the answer tokens a loss mask marks (all three
share the token cross-entropy, targets of -100 ignored); reward: a scalar score per response, read at its
final token, and the Bradley–Terry loss over every ranked pair of a prompt's responses; dpo: that loss on
the policy's implicit reward against a frozen reference (its variants, and KTO's unpaired loss, are in
raytrain/stages/).

A loss is a sum; the loop divides it by `count` summed over the whole global batch, so a step's gradient is
the same under any data-parallel layout. Any randomness (the masked-LM mask) is drawn for the whole
global batch from (seed, step), then sliced, so it does not depend on the parallel layout.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

IGNORE = -100


def causal_lm(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predict token t+1 from tokens ≤ t."""
    return rows[:, :-1], rows[:, 1:]


def masked_lm(rows: torch.Tensor, *, seed: int, step: int, first_row: int, global_batch: int,
              fraction: float, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a fraction of positions by the mask token; predict the originals there only."""
    tokens = rows[:, :-1]
    rng = np.random.Generator(np.random.Philox(key=seed, counter=step))
    chosen = rng.random((global_batch, tokens.shape[1])) < fraction
    chosen = torch.from_numpy(chosen[first_row : first_row + len(rows)]).to(rows.device)
    inputs = tokens.masked_fill(chosen, mask_id)
    targets = tokens.masked_fill(~chosen, IGNORE)
    return inputs, targets


def supervised(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine-tuning rows [b, 2, L] (tokens, loss mask): predict the next token where the mask marks it."""
    tokens, trained = rows[:, 0], rows[:, 1].bool()
    return tokens[:, :-1], tokens[:, 1:].masked_fill(~trained[:, 1:], IGNORE)


def trim_padding(rows: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad per batch: fine-tuning rows lose the positions after the last trained token of the longest example.

    Nothing later can change an earlier position's causal loss, so the loss is the same. The inputs stay a
    multiple of `multiple` long (sequence parallel splits them over tp ranks).
    """
    trained = rows[:, 1].any(dim=0).nonzero()
    needed = int(trained[-1]) if len(trained) else 1  # inputs up to the last target's position
    length = min(rows.shape[-1] - 1, -(-needed // multiple) * multiple)
    return rows[..., : length + 1]


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[n, L] log-probability of each targeted token (0 where IGNORE), from logits [n, L, V]."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return -nll.view(targets.shape)


def reply_logp(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[n] log-probability of each row's targeted tokens (its reply), from logits [n, L, V]."""
    return token_logps(logits, targets).sum(dim=1)


def target_count(targets: torch.Tensor) -> torch.Tensor:
    """How many positions carry a target (the rest are IGNORE)."""
    return (targets != IGNORE).sum()


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy over the targeted positions, number of them).

    Logits split over the vocabulary (loss parallel) give a replicated DTensor loss; its local
    value is the whole loss, and gradients flow back through it.
    """
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum")
    if isinstance(loss, DTensor):
        loss = loss.to_local()
    return loss, target_count(targets)


class Objective:
    """A language-model stage's rows → (inputs, targets), its attention, and its token loss.

    The loop sees only this interface (shared with PairwiseReward): `head` (the model's output layer),
    `causal`, `blank` (a row value that contributes nothing, or None), `reference` (DPO's targets need a frozen
    model's outputs, through `with_reference`), `reference_point` (KTO's targets need a statistic of the whole
    global batch, evaluate.with_reference_point), `__call__`, `count`, `loss` → (loss sum, [count, *sums]) and
    `metrics` of summed totals.
    """

    head = "lm"
    reference = False
    reference_point = False

    @classmethod
    def logged(cls) -> tuple[str, ...]:
        """The metric names `metrics` gives (the stage registry lists them for dashboards, reports, sweeps)."""
        return ("train/loss", "val/loss", "val/ppl")

    def __init__(self, kind: str, *, seed: int, global_batch: int, mask_fraction: float, mask_id: int,
                 trim_multiple: int = 0, packing: bool = False):
        self.kind = kind
        self.blank = 0 if kind == "sft" else None  # a row with no target: its loss mask all 0
        self.causal = kind in ("causal", "sft")
        self.seed = seed
        self.global_batch = global_batch
        self.mask_fraction = mask_fraction
        self.mask_id = mask_id
        self.trim_multiple = trim_multiple  # sft: trim padding to a multiple of this; 0 keeps full rows
        self.packing = packing  # sft: a micro-batch's examples packed into rows (train/packing.py)

    def __call__(self, rows: torch.Tensor, step: int, first_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "sft" and self.packing:
            from raytrain.train.packing import pack_supervised  # (it imports this module)

            return pack_supervised(rows, max(1, self.trim_multiple))
        if self.kind == "sft":
            return supervised(trim_padding(rows, self.trim_multiple) if self.trim_multiple else rows)
        if self.causal:
            return causal_lm(rows)
        return masked_lm(rows, seed=self.seed, step=step, first_row=first_row,
                         global_batch=self.global_batch, fraction=self.mask_fraction, mask_id=self.mask_id)

    def count(self, targets: torch.Tensor) -> torch.Tensor:
        return target_count(targets)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, count = token_loss(logits, targets)
        return loss, count.double().reshape(1)

    def metrics(self, totals: torch.Tensor, split: str) -> dict[str, float]:
        """totals: [loss sum, target count] summed over batches and ranks."""
        loss = float(totals[0] / totals[1].clamp(min=1))
        if split == "train":
            return {"train/loss": loss}
        return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}


class SupervisedObjective(Objective):
    """SFT's: the language-model loss on reply tokens, and in validation the share of held-out replies that greedy
    decoding would reproduce token for token (every reply token, its end of turn included, the model's argmax
    after the reply so far): on a verifiable task's data, its exact-match accuracy without generating."""

    @classmethod
    def logged(cls) -> tuple[str, ...]:
        return (*super().logged(), "val/accuracy")

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, count = token_loss(logits, targets)
        # Only where no gradient is taken (validation): under tensor parallelism the argmax gathers the vocabulary.
        exact = torch.zeros(2, dtype=torch.float64, device=count.device) if torch.is_grad_enabled() else (
            exact_replies(logits, targets))
        return loss, torch.cat([count.double().reshape(1), exact])

    def metrics(self, totals: torch.Tensor, split: str) -> dict[str, float]:
        """totals: [loss sum, target count, replies, replies exactly right] summed over batches and ranks; a pipeline
        schedule's validation gives [loss sum, target count] only (its last stage keeps the logits)."""
        metrics = super().metrics(totals, split)
        if split != "train" and len(totals) >= 4:
            metrics["val/accuracy"] = float(totals[3] / totals[2].clamp(min=1))
        return metrics


def exact_replies(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[replies, replies whose every token is the argmax] of logits [n, L, V] for targets [n, L]. A reply is a run of
    targeted positions: packed or padded rows alike, since every reply follows an untargeted prompt."""
    if isinstance(logits, DTensor):
        logits = logits.full_tensor()
    targeted = targets != IGNORE
    starts = targeted & ~F.pad(targeted[:, :-1], (1, 0), value=False)
    reply = starts.flatten().cumsum(0) - 1  # each position's reply (where targeted)
    wrong = ((logits.argmax(-1) != targets) & targeted).flatten()
    replies = int(starts.sum())
    errors = torch.zeros(replies, dtype=torch.long, device=targets.device).index_add_(
        0, reply[wrong], torch.ones_like(reply[wrong]))
    return torch.tensor([replies, int((errors == 0).sum())], dtype=torch.float64, device=targets.device)


def final_positions(responses: torch.Tensor, pad_id: int) -> torch.Tensor:
    """[..., L] token rows → index of each row's last non-pad token (its <|eos|>); -1 for an empty slot."""
    index = torch.arange(responses.shape[-1], device=responses.device)
    return torch.where(responses != pad_id, index, -1).amax(dim=-1)


def response_scores(outputs: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Score-head outputs [b·K, L, 1] → [b, K]: each response's score at its final token (0 for empty slots)."""
    per_position = outputs[..., 0].reshape(*ends.shape, -1)
    return per_position.gather(-1, ends.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (ends >= 0)


def ranked_pairs(ends: torch.Tensor) -> torch.Tensor:
    """[b, K, K] boolean: (i, j) with i ranked above j (i < j, best first) and both responses present."""
    present = ends >= 0
    above = torch.ones(ends.shape[-1], ends.shape[-1], dtype=torch.bool, device=ends.device).triu(1)
    return present.unsqueeze(-1) & present.unsqueeze(-2) & above


def pairwise_loss(scores: torch.Tensor, pairs: torch.Tensor, gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley–Terry: Σ over ranked pairs of −log σ(s_i − s_j − γ) = softplus(γ − (s_i − s_j)); γ is a margin the
    better response must win by (SimPO's; 0 elsewhere).

    Returns (loss sum, [pairs, pairs ranked right (s_i > s_j), Σ margin s_i − s_j]).
    """
    margin = scores.unsqueeze(-1) - scores.unsqueeze(-2)  # [b, K, K]: s_i − s_j
    weight = pairs.to(margin.dtype)
    loss = (F.softplus(gamma - margin) * weight).sum()
    detached = margin.detach().double()
    sums = torch.stack([pairs.sum().double(), ((detached > 0) & pairs).sum().double(), (detached * pairs).sum()])
    return loss, sums


class ScoreTargets(NamedTuple):
    """A reward model's targets: each response's final position in its row [b, K] (−1: empty slot) and, when the
    responses are packed, the flat index of that position in the packed rows."""

    ends: torch.Tensor
    at: torch.Tensor | None = None


class PreferenceTargets(NamedTuple):
    """DPO's (and its variants') targets: next tokens, IGNORE outside the replies [b·K, L] (or packed [n, T]), each
    response's final position [b, K], when packed the response each position belongs to [n, T], and once
    with_reference has run the reference's log-probs [b, K]."""

    tokens: torch.Tensor
    ends: torch.Tensor
    sequences: torch.Tensor | None = None
    reference_logp: torch.Tensor | None = None


class PairwiseReward:
    """Reward model: rows [b, K, row_len] of a prompt's responses, best first (empty slots all pad), followed by
    their K reply masks in data prepared with them (`responses` = K; 0: every row is a response).

    Inputs are the responses flattened to [b·K, L], cut after the longest one (to a multiple of
    `multiple`, which sequence parallelism needs); targets are each response's final position.
    """

    head = "score"
    causal = True
    prefix = "rm"  # of the training metrics
    reference = False  # whether targets need a frozen reference model's outputs (with_reference)
    reference_point = False  # whether they need a statistic of the whole global batch (with_reference_point)

    @classmethod
    def logged(cls) -> tuple[str, ...]:
        values = ("loss", "accuracy", "margin")
        return ("train/loss", *(f"{cls.prefix}/{v}" for v in values), *(f"val/{v}" for v in values))

    def __init__(self, pad_id: int, multiple: int = 1, responses: int = 0, packing: bool = False):
        self.pad_id = pad_id
        self.blank = pad_id  # a row of empty slots: no pair
        self.multiple = max(1, multiple)
        self.responses = responses
        self.packing = packing  # a micro-batch's responses packed into rows (train/packing.py)

    def __call__(self, rows: torch.Tensor, step: int, first_row: int):
        rows = rows[:, : self.responses] if self.responses else rows
        ends = final_positions(rows, self.pad_id)
        if self.packing:  # each response whole (through its final token), its score read where it was packed
            from raytrain.train.packing import pack  # (it imports this module)

            packed, placement = pack(rows.flatten(0, 1), (ends.flatten() + 1).tolist(), rows.shape[-1], self.multiple)
            at = torch.where(ends >= 0, placement.starts.view(ends.shape) + ends, -1)
            return packed, ScoreTargets(ends, at)
        return self._responses(rows, self._round_up(int(ends.max()) + 1)), ScoreTargets(ends)

    def _round_up(self, length: int) -> int:
        return -(-length // self.multiple) * self.multiple

    def _responses(self, rows: torch.Tensor, length: int) -> torch.Tensor:
        """[b, K, R] → [b·K, length], padded when longer than R."""
        if length > rows.shape[-1]:
            rows = F.pad(rows, (0, length - rows.shape[-1]), value=self.pad_id)
        return rows[..., :length].flatten(0, 1)

    def count(self, targets) -> torch.Tensor:
        return ranked_pairs(targets.ends).sum()

    @staticmethod
    def scores(outputs: torch.Tensor, targets: ScoreTargets) -> torch.Tensor:
        """[b, K] each response's score (0 for an empty slot)."""
        if targets.at is None:
            return response_scores(outputs.float(), targets.ends)
        return outputs[..., 0].float().flatten()[targets.at.clamp(min=0)] * (targets.ends >= 0)

    def loss(self, outputs: torch.Tensor, targets: ScoreTargets) -> tuple[torch.Tensor, torch.Tensor]:
        return pairwise_loss(self.scores(outputs, targets), ranked_pairs(targets.ends))

    def metrics(self, totals: torch.Tensor, split: str) -> dict[str, float]:
        """totals: [loss sum, pairs, pairs ranked right, margin sum]; train → rm/* (dpo/*), val → val/*."""
        pairs = float(totals[1].clamp(min=1))
        values = {"loss": float(totals[0]) / pairs, "accuracy": float(totals[2]) / pairs,
                  "margin": float(totals[3]) / pairs}
        if split == "train":  # train/loss too: progress lines, summaries and sweeps read it for every stage
            return {"train/loss": values["loss"], **{f"{self.prefix}/{k}": v for k, v in values.items()}}
        return {f"val/{k}": v for k, v in values.items()}

    def score_sums(self, outputs: torch.Tensor, targets: ScoreTargets) -> torch.Tensor:
        """[responses, Σ score, Σ score²] over the present responses (an empty slot's score is 0)."""
        scores = self.scores(outputs, targets).detach().double()
        return torch.stack([(targets.ends >= 0).sum().double(), scores.sum(), scores.pow(2).sum()])


class DirectPreference(PairwiseReward):
    """DPO (Rafailov et al., 2023) on the same preference rows, with the language-model head.

    Each response's log-probability under the policy, log π, is summed over its reply tokens (those its reply mask
    marks, through its end of turn); a frozen reference (the starting model) gives log π_ref. The implicit reward
    s = β·(log π − log π_ref) goes through the reward model's Bradley–Terry loss over the ranked pairs, which is
    DPO's −log σ(β·((log π_i − log π_ref,i) − (log π_j − log π_ref,j))). Targets: (next tokens, IGNORE outside the
    replies; final positions; and, once with_reference has run, the reference's log-probs [b, K]).
    """

    head = "lm"
    prefix = "dpo"
    reference = True

    def __init__(self, pad_id: int, beta: float, multiple: int = 1, responses: int = 0, packing: bool = False):
        super().__init__(pad_id, multiple, responses, packing)
        self.beta = beta

    def __call__(self, rows: torch.Tensor, step: int, first_row: int):
        k = self.responses
        if not k or rows.shape[1] != 2 * k:
            raise ValueError("DPO reads preference rows with reply masks; prepare them again with raytrain data prefs")
        ends = final_positions(rows[:, :k], self.pad_id)
        if self.packing:  # each response's inputs up to the token before its last, packed
            from raytrain.train.packing import pack  # (it imports this module)

            tokens, reply = rows[:, :k].flatten(0, 1), rows[:, k:].flatten(0, 1) == 1
            targets = tokens[:, 1:].masked_fill(~(reply & (tokens != self.pad_id))[:, 1:], IGNORE)
            packed, placement = pack(tokens, ends.flatten().clamp(min=0).tolist(), tokens.shape[-1] - 1,
                                     self.multiple)
            return packed, PreferenceTargets(placement.place(targets, IGNORE), ends, placement.sequences)
        # Inputs up to the position before the last token, a multiple long, and one more token: the last target.
        length = self._round_up(int(ends.max())) + 1
        tokens, reply = self._responses(rows[:, :k], length), self._responses(rows[:, k:], length) == 1
        reply &= tokens != self.pad_id  # a mask padded past the row (value pad) is no reply
        inputs, targets = tokens[:, :-1], tokens[:, 1:].masked_fill(~reply[:, 1:], IGNORE)
        return inputs, PreferenceTargets(targets, ends)

    @staticmethod
    def per_response(values: torch.Tensor, targets: PreferenceTargets) -> torch.Tensor:
        """[b, K] per-position values summed over each response's positions (packed or not)."""
        if targets.sequences is None:
            return values.sum(dim=1).view(targets.ends.shape)
        sequences = targets.sequences.flatten()
        kept = sequences >= 0
        total = values.new_zeros(targets.ends.numel())
        return total.index_add(0, sequences[kept], values.flatten()[kept]).view(targets.ends.shape)

    def sequence_logp(self, logits: torch.Tensor, targets: PreferenceTargets) -> torch.Tensor:
        """[b, K] log-probability of each response's reply tokens."""
        return self.per_response(token_logps(logits, targets.tokens), targets)

    def reply_lengths(self, targets: PreferenceTargets) -> torch.Tensor:
        """[b, K] reply tokens per response (at least 1, so that an empty slot divides by 1)."""
        return self.per_response((targets.tokens != IGNORE).long(), targets).clamp(min=1)

    def with_reference(self, targets: PreferenceTargets, reference_logits: torch.Tensor) -> PreferenceTargets:
        return targets._replace(reference_logp=self.sequence_logp(reference_logits, targets).detach())

    def loss(self, logits: torch.Tensor, targets: PreferenceTargets) -> tuple[torch.Tensor, torch.Tensor]:
        implicit_reward = self.beta * (self.sequence_logp(logits, targets) - targets.reference_logp)
        return pairwise_loss(implicit_reward, ranked_pairs(targets.ends))


def score_statistics(totals: torch.Tensor) -> dict[str, float]:
    """Mean and standard deviation of the scores that score_sums summed (PPO normalises rewards with them)."""
    n = float(totals[0])
    mean = float(totals[1]) / n
    return {"mean": mean, "std": math.sqrt(max(float(totals[2]) / n - mean**2, 0.0)), "responses": int(n)}
