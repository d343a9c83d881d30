"""`raytrain kto`: KTO (Ethayarajh et al., 2024) — alignment from completions labelled desirable or undesirable,
unpaired, against a frozen reference (the starting SFT model), on `raytrain data kto` rows."""

from __future__ import annotations

import dataclasses

import torch

from raytrain.stages.dpo import DirectPreferenceOptimisation
from raytrain.train.objectives import IGNORE, DirectPreference, reply_logp, supervised, trim_padding


@dataclasses.dataclass(frozen=True)
class KTOTargets:
    """A micro-batch's targets: the completions' next tokens (IGNORE outside the replies) [b, L], the labels [b]
    (1: desirable), the mismatched pairs' inputs and targets, then what the frozen reference gives the completions
    (log π_ref [b]) and the reference point z_ref of the whole global batch (a scalar)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    kl_inputs: torch.Tensor
    kl_tokens: torch.Tensor
    reference_logp: torch.Tensor | None = None
    reference_point: torch.Tensor | None = None

    @property
    def present(self) -> torch.Tensor:
        """[b] rows that hold a completion (a blank row past a split's end holds none)."""
        return (self.tokens != IGNORE).any(dim=1)


class KahnemanTversky(DirectPreference):
    """The implicit reward r = log π − log π_ref of each completion against the reference point z_ref, the mean of
    log π − log π_ref over the global batch's mismatched pairs (each prompt with another example's completion),
    clamped at 0 and not differentiated (TRL's estimate, taken over the whole global batch so that every layout
    computes the same one). Loss per completion: λ_D · (1 − σ(β(r − z_ref))) if desirable, λ_U · (1 −
    σ(β(z_ref − r))) if not; a mean over the completions. Metrics: accuracy is the share of completions on their
    label's side of the reference point, margin the mean β·r of the desirable minus the undesirable ones, and
    kto/kl the reference point."""

    prefix = "kto"
    reference_point = True

    @classmethod
    def logged(cls) -> tuple[str, ...]:
        return (*super().logged(), f"{cls.prefix}/kl")

    def __init__(self, pad_id: int, beta: float, desirable_weight: float, undesirable_weight: float,
                 multiple: int = 1):
        super().__init__(pad_id, beta, multiple)
        self.blank = 0  # a row of zeros: no completion, no label
        self.weights = (undesirable_weight, desirable_weight)

    def __call__(self, rows: torch.Tensor, step: int, first_row: int):
        if rows.shape[1] != 5:
            raise ValueError("KTO reads `raytrain data kto` rows (tokens, loss mask, mismatched pair, label)")
        inputs, tokens = supervised(trim_padding(rows[:, :2], self.multiple))
        kl_inputs, kl_tokens = supervised(trim_padding(rows[:, 2:4], self.multiple))
        return inputs, KTOTargets(tokens, rows[:, 4, 0], kl_inputs, kl_tokens)

    def count(self, targets: KTOTargets) -> torch.Tensor:
        return targets.present.sum()

    def with_reference(self, targets: KTOTargets, reference_logits: torch.Tensor) -> KTOTargets:
        return dataclasses.replace(targets, reference_logp=reply_logp(reference_logits, targets.tokens).detach())

    def kl_sums(self, policy_logits: torch.Tensor, reference_logits: torch.Tensor, targets: KTOTargets):
        """[Σ log π − log π_ref over the mismatched pairs present, their number] (no gradient)."""
        present = (targets.kl_tokens != IGNORE).any(dim=1)
        kl = reply_logp(policy_logits, targets.kl_tokens) - reply_logp(reference_logits, targets.kl_tokens)
        return torch.stack([(kl.double() * present).sum(), present.sum().double()])

    def with_point(self, targets: KTOTargets, kl_totals: torch.Tensor) -> KTOTargets:
        """The targets with the reference point of the global batch's kl_sums."""
        point = (kl_totals[0] / kl_totals[1].clamp(min=1)).clamp(min=0).float()
        return dataclasses.replace(targets, reference_point=point)

    def loss(self, logits: torch.Tensor, targets: KTOTargets) -> tuple[torch.Tensor, torch.Tensor]:
        reward = reply_logp(logits, targets.tokens) - targets.reference_logp
        point, present = targets.reference_point, targets.present
        desirable = (targets.labels == 1) & present
        undesirable = (targets.labels != 1) & present
        above = torch.sigmoid(self.beta * (reward - point))  # σ(β(r − z)); 1 − it is σ(β(z − r))
        losses = torch.where(desirable, self.weights[1] * (1 - above), self.weights[0] * above) * present
        scaled = self.beta * reward.detach().double()
        right = torch.where(desirable, reward.detach() > point, reward.detach() < point) & present
        sums = torch.stack([present.sum().double(), right.sum().double(), (scaled * desirable).sum(),
                            desirable.sum().double(), (scaled * undesirable).sum(), undesirable.sum().double(),
                            point.double() * present.sum()])
        return losses.sum(), sums

    def metrics(self, totals: torch.Tensor, split: str) -> dict[str, float]:
        """totals: [loss sum, completions, on their side, Σ β·r desirable, desirable, Σ β·r undesirable,
        undesirable, Σ z_ref per completion]."""
        n = float(totals[1].clamp(min=1))
        margin = float(totals[3] / totals[4].clamp(min=1) - totals[5] / totals[6].clamp(min=1))
        values = {"loss": float(totals[0]) / n, "accuracy": float(totals[2]) / n, "margin": margin}
        if split == "train":
            return {"train/loss": values["loss"], **{f"{self.prefix}/{k}": v for k, v in values.items()},
                    f"{self.prefix}/kl": float(totals[7]) / n}
        return {f"val/{k}": v for k, v in values.items()}


class KahnemanTverskyOptimisation(DirectPreferenceOptimisation):
    name = "kto"
    order = 46
    help = "KTO: align an SFT model on completions labelled desirable or undesirable (unpaired)"
    objectives = ("kto",)
    objective_class = KahnemanTversky
    data_kind = "kto"
    packs = False  # its rows carry mismatched pairs beside the completions: padded per batch
    what = "KTO"

    def make_objective(self, config, special, multiple):
        train = config.train
        return KahnemanTversky(special["pad"], train.kto_beta, train.kto_desirable_weight,
                               train.kto_undesirable_weight, multiple)

    def check_data(self, dataset):
        pass  # `raytrain data kto` rows always hold their labels and mismatched pairs


STAGE = KahnemanTverskyOptimisation()
