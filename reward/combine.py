"""Normalised terms for combined rewards, so that "HPS + 0.5 x aesthetic" weighs what it says.

Raw rewards live on scales 10^3 apart (HPS ~0.3 with a spread of a few hundredths, colourfulness
0-150): a weight of 1 on colourfulness drowns HPS. `NormalizedReward` wraps one term:

- "scale": (r - low) / (high - low) with the kind's typical range (reward/ranges.py): a fixed
  affine map, the same in every run, so 0..1 means "bottom to top of what this reward usually
  gives".
- "zscore": (r - running mean) / running std of this term's scores on the training rollouts
  (Welford, float64). The statistics start from the typical range (mean = its middle, std = a
  quarter of its width) until two scores were seen; they update only inside
  `updating_statistics(reward)` (the trainer's training rollouts, never scoring nodes or held-out
  evaluation), reset at the start of every training run and are saved with its checkpoints.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch

from .base import Reward, WeightedReward
from .ranges import TypicalRange, typical_range

NORMALIZATIONS = ("none", "scale", "zscore")


class NormalizedReward(Reward):
    def __init__(self, reward: Reward, mode: str, limits: TypicalRange | None = None):
        super().__init__()
        if mode not in ("scale", "zscore"):
            raise ValueError(f"normalisation must be 'scale' or 'zscore', got {mode!r}")
        limits = limits or typical_range(reward)
        if limits is None:
            raise ValueError(f"reward {reward.name!r} has no typical range: it cannot be normalised by a fixed scale; "
                             "use normalisation 'none' for it")
        self.reward, self.mode, self.limits = reward, mode, limits
        self.name = getattr(reward, "name", "reward")
        self.updating = False
        self.reset_statistics()

    # -- running statistics --------------------------------------------------------------------

    def reset_statistics(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def statistics_state(self) -> dict:
        return {"name": self.name, "mode": self.mode, "count": self.count, "mean": self.mean, "m2": self.m2}

    def load_statistics_state(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"normalisation state of {state.get('name')!r} does not belong to {self.name!r}")
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])

    def _update(self, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        values = values[torch.isfinite(values)]
        n = values.numel()
        if n == 0:
            return
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    def current(self) -> tuple[float, float]:
        """(centre, spread) the scores are normalised with right now."""
        width = self.limits.high - self.limits.low
        if self.mode == "scale":
            return self.limits.low, width
        if self.count < 2:
            return 0.5 * (self.limits.low + self.limits.high), 0.25 * width
        std = math.sqrt(self.m2 / (self.count - 1))
        return self.mean, max(std, 1e-3 * width)

    # -- scoring -------------------------------------------------------------------------------

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raw = self.reward(frames, prompts)
        if self.mode == "zscore" and self.updating:
            self._update(raw)
        centre, spread = self.current()
        return (raw - centre) / spread


def normalized_combination(terms: Sequence[tuple[Reward, float]], normalization: str = "none") -> WeightedReward:
    """WeightedReward of the terms, each normalised first (see the module doc)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalisation must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
    if normalization != "none":
        terms = [(NormalizedReward(reward, normalization), weight) for reward, weight in terms]
    combined = WeightedReward(terms)
    if normalization != "none":
        combined.name = f"{combined.name} ({normalization}-normalised)"
    return combined


@contextlib.contextmanager
def updating_statistics(reward: torch.nn.Module):
    """Inside the block, z-score terms of `reward` learn from the scores they give."""
    modules = [m for m in reward.modules() if isinstance(m, NormalizedReward)]
    for module in modules:
        module.updating = True
    try:
        yield
    finally:
        for module in modules:
            module.updating = False
