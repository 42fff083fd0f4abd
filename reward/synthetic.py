"""Synthetic videos with known motion, for tests and measured ranges of the time-aware rewards.

A smooth random texture (a sum of oriented sinusoids) is evaluated analytically at moved
coordinates, so every frame is exact (no interpolation error) and the true flow is known:
frame_t(x) = texture(x - d_t(x)), hence frame_{t+1}(x + v) = frame_t(x) for a pan by v per frame.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Displacement = Callable[[torch.Tensor, torch.Tensor, int], tuple]


def texture(x: torch.Tensor, y: torch.Tensor, seed: int = 0, waves: int = 12) -> torch.Tensor:
    """(3, H, W) in [0, 1]: colour sinusoids of random orientation and 0.02-0.12 cycles/pixel."""
    generator = torch.Generator().manual_seed(seed)
    out = torch.zeros(3, *x.shape)
    for _ in range(waves):
        frequency, angle, phase = (torch.rand(3, generator=generator) * torch.tensor([0.1, 2 * math.pi, 2 * math.pi])
                                   + torch.tensor([0.02, 0.0, 0.0])).tolist()
        colour = torch.rand(3, generator=generator).view(3, 1, 1)
        out = out + colour * torch.sin(2 * math.pi * frequency * (math.cos(angle) * x + math.sin(angle) * y) + phase)
    return (out / waves * 1.5 + 0.5).clamp(0.0, 1.0)


def moving_video(displacement: Displacement, frames: int = 5, size: int = 64, seed: int = 0) -> torch.Tensor:
    """(frames, 3, size, size): frame t = texture(x - d_t(x)), d_t = displacement(x, y, t)."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    video = []
    for t in range(frames):
        dx, dy = displacement(xs, ys, t)
        video.append(texture(xs - dx, ys - dy, seed))
    return torch.stack(video)


def pan_video(dx: float, dy: float = 0.0, frames: int = 5, size: int = 64, seed: int = 0) -> torch.Tensor:
    """A camera pan by (dx, dy) pixels per frame; (0, 0) is a static video."""
    return moving_video(lambda x, y, t: (dx * t, dy * t), frames, size, seed)


def flicker_video(amount: float = 0.3, frames: int = 5, size: int = 64, seed: int = 0) -> torch.Tensor:
    """A static image whose brightness drops by `amount` on every other frame."""
    still = pan_video(0.0, 0.0, frames, size, seed)
    gains = torch.tensor([1.0 - amount * (t % 2) for t in range(frames)]).view(-1, 1, 1, 1)
    return still * gains
