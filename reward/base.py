"""The one contract every reward follows, and the weighted combination of rewards."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Reward(nn.Module):
    """frames (B, 3, H, W) in [0, 1] + B prompts -> scores (B,) float32 on the frames' device.

    Differentiable with respect to `frames`; the reward's own weights are frozen (no gradient ever
    reaches them). Subclasses implement `score`; `forward` checks the contract once for all.
    """

    name: str = "reward"

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, frames: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"{self.name}: expected frames (B, 3, H, W), got {tuple(frames.shape)}")
        prompts = broadcast_prompts(prompts, frames.shape[0])
        # On the frames' device whatever the weights' device: terms of a WeightedReward whose
        # models sit on different devices (or on the CPU while frames are on the GPU) must add up.
        return self.score(frames, prompts).float().to(frames.device)

    def freeze(self) -> "Reward":
        """Reward weights never train: no grads, eval mode (dropout off)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "Reward":
        # A reward is a fixed judge: keep dropout/batch-norm off even when a trainer calls .train().
        return super().train(False)


def broadcast_prompts(prompts: Sequence[str] | str | None, batch: int) -> list[str]:
    """One prompt for every frame, or exactly one prompt per frame."""
    if prompts is None:
        return [""] * batch
    if isinstance(prompts, str):
        return [prompts] * batch
    prompts = list(prompts)
    if len(prompts) == 1:
        return prompts * batch
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for {batch} frames: give one, or one per frame")
    return prompts


class WeightedReward(Reward):
    """sum_i weight_i * reward_i(frames, prompts): "HPS + 0.5 x aesthetic - motion loss"."""

    def __init__(self, terms: Sequence[tuple[Reward, float]]):
        super().__init__()
        if not terms:
            raise ValueError("a combined reward needs at least one term")
        self.rewards = nn.ModuleList([r for r, _ in terms])
        self.weights = [float(w) for _, w in terms]
        self.name = " + ".join(f"{w:g}*{r.name}" for r, w in terms)

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        total = None
        for reward, weight in zip(self.rewards, self.weights):
            term = weight * reward(frames, prompts)
            total = term if total is None else total + term
        return total
