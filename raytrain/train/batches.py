"""The loop's batch source for stages that train on prepared rows (pretrain, sft, reward, dpo).

A batch source is what the loop drives (train/loop.py): `rounds` rounds of `steps_per_round` steps, each step's
rows from `batches`, held-out metrics from `validate`, and what a checkpoint must hold to resume (`state`) and
say of the data (`checkpoint_meta`). Prepared rows are one step per round, their order a pure function of
(rows, seed, step, global batch): resuming needs no state. PPO's experience source (rlhf/experience_source.py)
is the other one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from raytrain.data.manifest import PreparedDataset
from raytrain.data.stream import BatchOrder, stream_batches
from raytrain.model.flops import train_flops_per_token
from raytrain.train.evaluate import forward_loss_sums, split_sums


class PreparedBatches:
    steps_per_round = 1

    def __init__(self, worker, make_objective: Callable):
        """make_objective(special token ids, multiple): the stage's objective for this data; inputs are trimmed
        to a multiple of `multiple` (0: never), which sequence parallelism needs, except under pipelining, whose
        stages keep the shapes of their first step."""
        self.worker = worker
        train, layout = worker.config.train, worker.layout
        self.dataset = PreparedDataset.open(train.data)
        self.seq_len = self.dataset.seq_len
        self.order = BatchOrder(self.dataset.split("train").num_rows, train.global_batch, train.seed)
        self.local_batch = self.order.local_batch(layout.dp)
        self.special = self.dataset.manifest["tokenizer"]["special_tokens"]
        self.objective = make_objective(self.special, layout.tp if layout.pp == 1 else 0,
                                        **self.dataset.objective_options)
        self.has_val = self.dataset.split("val").num_rows > 0
        self.rounds = train.steps

    def batches(self, start_step: int) -> Iterator[tuple[int, torch.Tensor]]:
        worker = self.worker
        stream = stream_batches(self.dataset, self.order, consumer=worker.layout.dp_rank,
                                num_consumers=worker.layout.dp, start_step=start_step,
                                num_steps=self.rounds - start_step, ray_data=worker.context.ray_data)
        for step, rows in stream:
            yield step, torch.from_numpy(rows).long().to(worker.device)

    def flops_per_token(self) -> float:
        return train_flops_per_token(self.worker.config.model, self.seq_len, self.objective.head, self.objective.causal)

    def validate(self, step: int) -> dict[str, float]:
        worker = self.worker
        if worker.schedule is not None:
            sums_of = worker.pipeline_eval
        else:
            sums_of = forward_loss_sums(worker.modules[0], self.objective, worker.compute, worker.reference,
                                        worker.dp_sum)
        return self.objective.metrics(self.split_sums(sums_of, "val", worker.train.val_batches), "val")

    def split_sums(self, sums_of, split: str, batches: int) -> torch.Tensor:
        """sums_of summed over a split's batches (0: all) and the data-parallel ranks, in eval mode. Read in this
        process: a validation's few batches (or one pass for the reward model's score statistics) do not repay
        starting a Ray Data execution each time."""
        worker = self.worker
        with worker.eval_mode():
            totals = split_sums(self.dataset, self.objective, sums_of, split=split, batches=batches,
                                global_batch=worker.train.global_batch, consumer=worker.layout.dp_rank,
                                num_consumers=worker.layout.dp, device=worker.device, ray_data=False)
        return worker.dp_sum(totals)

    stop_reason = ""  # a source may end the run early (PPO's health monitors) by saying why here

    def round_metrics(self, round_: int, trained: Callable[[], dict[str, float]]) -> dict[str, float]:
        """What the source logs after round `round_`; trained() gives the loss's metrics of the round's steps
        (a collective: called on every rank or none)."""
        return {}

    def on_log(self, step: int) -> None:
        pass

    def finish(self, step: int) -> None:
        pass

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def checkpoint_meta(self) -> dict:
        train = self.worker.train
        return {"mask_fraction": train.mask_fraction, "data": str(self.dataset.root),
                "tokenizer": self.dataset.manifest["tokenizer"]}
