"""Reinforcement learning and preference optimisation: objectives, rollouts, and the GRPO/DPO recipes."""
