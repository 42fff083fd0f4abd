"""Reward backpropagation: LoRA training on EasyAnimate with truncated gradients through the sampler.

Core API (no ComfyUI imports): `RewardLoRATrainer`, `TrainConfig` (training/trainer.py,
training/config.py); CLI: `python -m easyanimate_reward.training --help`.
"""
