"""The one contract every reward follows, and the weighted combination of rewards."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class RewardInputError(ValueError):
    """Frames or prompts that break the reward contract (range, dtype, empty batch, no prompts)."""


def reads_data(tensor: torch.Tensor) -> bool:
    """False for tensors without data to read: fake tensors (FakeTensorMode, used by the memory
    simulation to run the pack's own code at real sizes) and meta tensors."""
    from torch._subclasses.fake_tensor import is_fake

    return not (tensor.is_meta or is_fake(tensor))


def check_frames(frames: torch.Tensor, name: str = "reward") -> None:
    """The one place where a reward's frames are checked: (B, 3, H, W), B >= 1, floating point,
    every value in [0, 1] (NaN passes: a diverged video scores NaN and ranks last). The value checks read the data and are skipped for fake
    and meta tensors (shape and dtype are still checked)."""
    if not isinstance(frames, torch.Tensor):
        raise RewardInputError(f"{name}: frames must be a tensor (B, 3, H, W), got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise RewardInputError(f"{name}: expected frames (B, 3, H, W), got {tuple(frames.shape)}")
    if frames.shape[0] == 0:
        raise RewardInputError(f"{name}: the batch is empty (0 frames); give at least one frame")
    if not frames.is_floating_point():
        raise RewardInputError(
            f"{name}: frames are {frames.dtype}; rewards take floating-point frames in [0, 1] "
            "(divide uint8 images by 255)")
    if not reads_data(frames):
        return
    with torch.no_grad():
        values = frames.detach()
        values = torch.where(torch.isnan(values), torch.zeros((), dtype=values.dtype, device=values.device), values)
        low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        hint = (" (they look like [-1, 1] VAE output: use x / 2 + 0.5)" if low < 0.0 and high <= 1.0
                else " (they look like 0..255 values: divide by 255)" if high > 1.0 and low >= 0.0 else "")
        raise RewardInputError(f"{name}: frames must lie in [0, 1]; got values from {low:g} to {high:g}{hint}")


def module_device(module: nn.Module) -> torch.device | None:
    """The device of a module's first parameter or buffer; None when it holds no tensors
    (a weight-free reward then follows its input)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return None


class Reward(nn.Module):
    """frames (B, 3, H, W) in [0, 1] + B prompts -> scores (B,) float32 on the frames' device.

    Differentiable with respect to `frames`; the reward's own weights are frozen (no gradient ever
    reaches them). Subclasses implement `score`; `forward` checks the contract once for all.
    """

    name: str = "reward"
    # True for rewards that judge how well frames match a prompt (CLIP-style): they refuse prompts=None.
    needs_prompts: bool = False

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, frames: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        check_frames(frames, self.name)
        if prompts is None and self.needs_prompts:
            raise RewardInputError(f"{self.name} scores frames against their prompt: give prompts "
                                   "(one, or one per frame), not None")
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
        for reward, weight in terms:
            if not isinstance(weight, (int, float)) or not math.isfinite(float(weight)):
                raise ValueError(f"reward weight {weight!r} for {reward.name} must be a finite number")
        self.rewards = nn.ModuleList([r for r, _ in terms])
        self.weights = [float(w) for _, w in terms]
        self.name = " + ".join(f"{w:g}*{r.name}" for r, w in terms)
        self.needs_prompts = any(r.needs_prompts for r, _ in terms)

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        total = None
        for reward, weight in zip(self.rewards, self.weights):
            term = weight * reward(frames, prompts)
            total = term if total is None else total + term
        return total
