"""meshrl: RLHF (PPO, DPO, GRPO and relatives) on a Megatron-style 3D-parallel engine."""

__version__ = "0.1.0"
