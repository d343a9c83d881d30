"""PPO's health monitors on numbers made by hand (no Ray): each fires when it should and not before, and its
baselines survive a checkpoint."""

from raytrain.config import HealthConfig
from raytrain.rlhf.health import HealthMonitors

CALM = {"ppo/kl": 0.1, "ppo/response_len": 8.0, "ppo/entropy": 2.0, "ppo/reward_std": 0.5, "ppo/clipfrac": 0.05}
VARIED = [[i, i + 1] for i in range(8)]  # 4 prompts × 2 samples, every response different


def fired_after(*iterations, responses=VARIED, group=2) -> dict[str, str]:
    monitors = HealthMonitors(HealthConfig())
    fired = {}
    for changes in iterations:
        fired = monitors.iteration({**CALM, **changes}, responses, group)
    return fired


def test_a_calm_run_fires_nothing():
    assert fired_after({}, {}, {"ppo/kl": 0.2, "ppo/response_len": 12.0, "ppo/entropy": 1.0}) == {}


def test_each_iteration_monitor_fires_on_its_sign():
    assert set(fired_after({}, {"ppo/kl": 1.5})) == {"kl_spike"}  # 15× the earlier mean, above 1 nat
    assert fired_after({"ppo/kl": 0.5}, {"ppo/kl": 0.9}) == {}  # under the 1-nat floor
    assert set(fired_after({}, {"ppo/response_len": 17.0})) == {"length_blowup"}  # over 2× the first 8
    assert set(fired_after({}, {"ppo/entropy": 0.1})) == {"entropy_collapse"}  # under 0.1× the first 2.0
    assert set(fired_after({"ppo/clipfrac": 0.4})) == {"clip_fraction"}
    same = [[7, 7, 7]] * 6 + [[1], [2]]  # one answer to 3 of 4 prompts
    fired = fired_after({}, responses=same)
    assert set(fired) == {"repeated_response"} and "3 of the 4 prompts" in fired["repeated_response"]
    assert fired_after({}, responses=same[:4], group=2) == {}  # 2 prompts: too few to say
    assert fired_after({}, responses=[[7]] * 2 + VARIED[2:]) == {}  # repeated within one prompt's samples only


def test_reward_divergence_needs_held_out_down_and_train_up():
    monitors = HealthMonitors(HealthConfig())
    monitors.iteration(CALM, VARIED, 2)  # reward std 0.5: a gap of 0.25 × 0.5
    assert monitors.validation(held_out=0.5, train=0.2) == {}  # the first validation: nothing to compare
    assert monitors.validation(held_out=0.45, train=0.6) == {}  # held-out fell 0.05 < 0.125
    assert monitors.validation(held_out=0.6, train=0.9) == {}  # both rose
    fired = monitors.validation(held_out=0.3, train=1.2)
    assert set(fired) == {"reward_divergence"} and "fell 0.3" in fired["reward_divergence"]


def test_baselines_resume_from_a_checkpoint():
    first = HealthMonitors(HealthConfig())
    first.iteration(CALM, VARIED, 2)
    resumed = HealthMonitors(HealthConfig())
    resumed.load_state(first.state())
    assert set(resumed.iteration({**CALM, "ppo/response_len": 20.0, "ppo/kl": 2.0}, VARIED, 2)) == {
        "length_blowup", "kl_spike"}


def test_an_iteration_that_trained_on_nothing_checks_no_loss_metric():
    quiet = {k: v for k, v in CALM.items() if k not in ("ppo/entropy", "ppo/clipfrac")}
    monitors = HealthMonitors(HealthConfig())
    assert monitors.iteration(quiet, VARIED, 2) == {}  # DAPO dropped every group: no entropy to compare
    assert monitors.iteration(CALM, VARIED, 2) == {} and monitors.first["ppo/entropy"] == 2.0


def test_reward_divergence_waits_for_a_reward_spread_to_measure_by():
    monitors = HealthMonitors(HealthConfig())
    monitors.iteration({**CALM, "ppo/reward_std": 0.0}, VARIED, 2)  # a 0/1 reward that scored all alike
    monitors.validation(held_out=0.5, train=0.0)
    assert monitors.validation(held_out=0.49, train=0.01) == {}  # no scale yet: no divergence to speak of
    monitors.iteration(CALM, VARIED, 2)  # now a std of 0.5
    assert set(monitors.validation(held_out=0.2, train=0.5)) == {"reward_divergence"}
