"""Rewards that look at time: motion and motion-compensated temporal consistency.

Both follow the reward contract (frames (B, 3, H, W) in [0, 1] -> (B,) float32, differentiable)
with the frames of one video consecutive along B. `frames_per_video` splits B into videos (None:
the whole call is one video); nothing is ever compared across two videos. Every frame of a
video carries that video's score, so the mean over a video's frames is the video's score.
A one-frame video has no motion to measure: it scores 0 (the trainer warns about that).

- `MotionReward` ("motion"): mean optical-flow magnitude (pixels of the frame per frame step)
  between consecutive frames, over the pixels whose flow stays inside the frame. A positive
  weight rewards motion, e.g. "hps_v2.1 + 0.05 * motion" against lost dynamism.
- `FlowConsistencyReward` ("temporal_consistency"): minus the mean absolute RGB error of each
  frame against the next frame warped back by the estimated flow (motion compensated), over the
  pixels visible in both. A smooth pan scores near 0; flicker, popping and texture boiling score
  low. Unlike a plain frame difference it does not pay for freezing the video.

`whole_video = True`: batch scorers (reward/scoring.py, the trainer) hand these rewards one
video's frames per call (`score_per_video`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import Reward
from .flow import PyramidFlow, consecutive_flows, inside_mask, warp


def video_lengths(total: int, frames_per_video: int | None, name: str) -> int:
    length = frames_per_video or total
    if length < 1 or total % length:
        raise ValueError(f"{name}: batch of {total} frames is not a whole number of {length}-frame videos")
    return length


class _TimeReward(Reward):
    whole_video = True  # compares frames with each other: batch scorers must not split a video

    def __init__(self, estimator: nn.Module | None = None, frames_per_video: int | None = None):
        super().__init__()
        if frames_per_video is not None and int(frames_per_video) < 1:
            raise ValueError(f"frames_per_video must be >= 1, got {frames_per_video}")
        self.estimator = estimator if estimator is not None else PyramidFlow()
        self.frames_per_video = None if frames_per_video is None else int(frames_per_video)

    def video_score(self, video: torch.Tensor) -> torch.Tensor:
        """(F, 3, H, W) of one video, F >= 2 -> scalar."""
        raise NotImplementedError

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        frames = frames.float()
        length = video_lengths(frames.shape[0], self.frames_per_video, self.name)
        scores = []
        for video in frames.split(length):
            if video.shape[0] < 2:
                value = video.sum() * 0.0  # keeps the graph connected
            else:
                value = self.video_score(video)
            scores.append(value.reshape(1).expand(video.shape[0]))
        return torch.cat(scores)


class MotionReward(_TimeReward):
    """Mean flow magnitude between consecutive frames of a video (pixels per frame step)."""

    name = "motion"

    def video_score(self, video: torch.Tensor) -> torch.Tensor:
        flow = consecutive_flows(self.estimator, video)
        # sqrt(|f|^2 + eps) - sqrt(eps), written so that a zero flow gives exactly 0 (a still video)
        # and the gradient stays finite there.
        squared = flow.pow(2).sum(dim=1, keepdim=True)
        magnitude = squared / (squared.add(1e-8).sqrt() + 1e-4)
        mask = inside_mask(flow, margin=1.0)
        return (magnitude * mask).sum() / mask.sum().clamp_min(1.0)


class FlowConsistencyReward(_TimeReward):
    """Minus the motion-compensated warp error between consecutive frames (RGB, mean absolute).

    `detach_flow` (default): the flow is a fixed correspondence for the gradient, which then acts
    on the pixels only (the estimator's own gradient would let an optimiser game the estimate)."""

    name = "temporal_consistency"

    def __init__(self, estimator: nn.Module | None = None, frames_per_video: int | None = None,
                 detach_flow: bool = True):
        super().__init__(estimator, frames_per_video)
        self.detach_flow = bool(detach_flow)

    def video_score(self, video: torch.Tensor) -> torch.Tensor:
        flow = consecutive_flows(self.estimator, video)
        if self.detach_flow:
            flow = flow.detach()
        warped = warp(video[1:], flow)
        mask = inside_mask(flow, margin=1.0)
        error = (warped - video[:-1]).abs().mean(dim=1, keepdim=True)
        return -(error * mask).sum() / mask.sum().clamp_min(1.0)


def score_per_video(reward: Reward, frames: torch.Tensor, prompts: Sequence[str],
                    frames_per_video: int) -> torch.Tensor:
    """reward(frames, prompts), but a reward with a time-aware part is called once per video, so
    it only ever sees one video's frames. frames (B, 3, H, W), videos consecutive along B."""
    from .scoring import needs_whole_video

    total = frames.shape[0]
    if frames_per_video < 1 or total % frames_per_video:
        raise ValueError(f"{total} frames are not a whole number of {frames_per_video}-frame videos")
    if not needs_whole_video(reward) or total == frames_per_video:
        return reward(frames, list(prompts))
    prompts = list(prompts)
    parts = []
    for start in range(0, total, frames_per_video):
        stop = start + frames_per_video
        parts.append(reward(frames[start:stop], prompts[start:stop]))
    return torch.cat(parts)


def time_aware_terms(reward: nn.Module) -> list[nn.Module]:
    """The parts of a reward that compare frames over time (motion, temporal consistency)."""
    return [m for m in reward.modules() if getattr(m, "whole_video", False)]
