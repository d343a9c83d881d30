"""RLHF: the PPO/GRPO/DPO math, and (to come) the rollout and reward actor pools and the PPO learner."""
