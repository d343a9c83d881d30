"""PPO's health monitors: on every iteration, the signs of a run going wrong that a person would otherwise find
late in samples.jsonl — a KL spike, responses growing without bound, the policy's entropy collapsing, updates
too large for the clip range, the held-out reward falling while the train reward rises (reward hacking), and one
response given to many prompts. Each fires as a metric (health/NAME), a warning line and a W&B alert; one named
in ppo.stop_on ends the run with a checkpoint (the loop reads `stop_reason`).

Every input is a number or token list every rank holds alike, so every rank decides the same. The baselines (the
first iteration's numbers, the recent KLs, the last validation) are checkpoint state: a resumed run decides as the
uninterrupted one.
"""

from __future__ import annotations

import typing
from collections import Counter

from raytrain.config import HealthConfig, Monitor

MONITORS: tuple[str, ...] = typing.get_args(Monitor)
KL_WINDOW = 10  # a spike is measured against the mean KL of this many earlier iterations
MIN_PROMPTS = 4  # fewer distinct prompts say nothing about one response repeated across them


class HealthMonitors:
    def __init__(self, health: HealthConfig):
        self.health = health
        self.first: dict[str, float] = {}  # the first iteration's response length, entropy and reward std
        self.kls: list[float] = []
        self.validated: list[float] | None = None  # [held-out reward, train reward] at the last validation

    def state(self) -> dict:
        return {"first": dict(self.first), "kls": list(self.kls), "validated": self.validated}

    def load_state(self, state: dict) -> None:
        self.first, self.kls, self.validated = dict(state["first"]), list(state["kls"]), state["validated"]

    def iteration(self, metrics: dict[str, float], responses: list[list[int]], group: int) -> dict[str, str]:
        """{monitor: why} for each monitor the iteration fires: metrics holds its ppo/kl, ppo/response_len,
        ppo/reward_std and, when some row was trained on, ppo/entropy and ppo/clipfrac; responses its samples,
        `group` per prompt in a row."""
        health, fired = self.health, {}
        for key in ("ppo/response_len", "ppo/entropy", "ppo/reward_std"):
            # The loss's metrics are missing when no row was trained on (DAPO); a reward std of 0 (every sample
            # scored alike) is no scale to measure a divergence by: the first iteration with a spread sets it.
            if key in metrics and (key != "ppo/reward_std" or metrics[key] > 0):
                self.first.setdefault(key, metrics[key])
        kl, earlier = metrics["ppo/kl"], self.kls[-KL_WINDOW:]
        if earlier:
            mean = sum(earlier) / len(earlier)
            if kl > health.kl_floor and kl > health.kl_spike * mean:
                fired["kl_spike"] = (f"KL to the reference {kl:.3g} nats, over {health.kl_spike:g}× the mean of the "
                                     f"last {len(earlier)} iterations ({mean:.3g})")
        self.kls.append(kl)
        length, first_length = metrics["ppo/response_len"], self.first["ppo/response_len"]
        if length > health.length_growth * first_length:
            fired["length_blowup"] = (f"mean response length {length:.1f} tokens, over {health.length_growth:g}× "
                                      f"the first iteration's {first_length:.1f}")
        entropy, first_entropy = metrics.get("ppo/entropy"), self.first.get("ppo/entropy")
        if entropy is not None and entropy < health.entropy_drop * first_entropy:
            fired["entropy_collapse"] = (f"policy entropy {entropy:.3g} nats/token, under {health.entropy_drop:g}× "
                                         f"the first iteration's {first_entropy:.3g}")
        if metrics.get("ppo/clipfrac", 0.0) > health.clipfrac_max:
            fired["clip_fraction"] = (f"{metrics['ppo/clipfrac']:.0%} of the ratios clipped (over "
                                      f"{health.clipfrac_max:.0%}): lower train.lr or raise ppo.minibatches")
        prompts = len(responses) // group
        if prompts >= MIN_PROMPTS:
            answered = {(i // group, tuple(r)) for i, r in enumerate(responses)}  # each prompt's distinct ones
            response, count = Counter(r for _, r in answered).most_common(1)[0]
            if count >= health.repeat_fraction * prompts:
                fired["repeated_response"] = (f"one response ({len(response)} tokens) answers {count} of the "
                                              f"{prompts} prompts")
        return fired

    def validation(self, held_out: float, train: float) -> dict[str, str]:
        """{"reward_divergence": why} when, since the last validation, the held-out reward fell and the train
        reward rose, each by more than ppo.health.reward_gap × the first iteration's reward std."""
        previous, self.validated = self.validated, [held_out, train]
        if previous is None or "ppo/reward_std" not in self.first:
            return {}
        gap = self.health.reward_gap * self.first["ppo/reward_std"]
        fell, rose = previous[0] - held_out, train - previous[1]
        if fell > gap and rose > gap:
            return {"reward_divergence": f"held-out reward fell {fell:.3g} while the train reward rose {rose:.3g} "
                                         "since the last validation: the policy may be exploiting the reward"}
        return {}
