"""RLHF: the rollout and reward actor pools (actors.py), the experience source the PPO stage's loop drives
(experience_source.py: weight sync, rollouts, scores, advantages), the typed experience batch (experience.py),
the PPO/GRPO objective (objective.py), prompts, Python rewards, and the PPO/GRPO/DPO math as pure functions
(ppo_math.py)."""
