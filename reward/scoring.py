"""Scoring many frames in batches, and ranking candidate videos: the core behind the reward nodes.

Frames arrive as ComfyUI-style IMAGE tensors (N, H, W, 3) in [0, 1]; rewards take (B, 3, H, W).
Evaluation only: everything runs under `torch.no_grad()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..easyanimate.cancel import check_cancel
from .base import Reward, module_device

Progress = Callable[[int, int], None]


def needs_whole_video(reward: Reward) -> bool:
    """True when some part of the reward compares frames with each other (temporal consistency):
    then a video must be scored in one call, never split into batches."""
    return any(getattr(module, "whole_video", False) for module in reward.modules())


def _chunks(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, stop)) for i in range(start, stop, size)]


@torch.no_grad()
def score_images(
    reward: Reward,
    images: torch.Tensor,
    prompt: str | Sequence[str],
    batch_size: int = 8,
    frames_per_video: int | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """IMAGE (N, H, W, 3) in [0, 1] -> per-frame scores (N,) float32 on the CPU.

    `frames_per_video` (default: all N frames are one video) matters only for rewards that
    compare frames (temporal consistency): each video is then scored in one piece. Other rewards
    are scored `batch_size` frames at a time. `prompt`: one for all frames, or one per video.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected IMAGE frames (N, H, W, 3), got {tuple(images.shape)}")
    total = images.shape[0]
    length = frames_per_video or total
    if total % length:
        raise ValueError(f"{total} frames are not a whole number of {length}-frame videos")
    prompts = [prompt] * (total // length) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != total // length:
        raise ValueError(f"got {len(prompts)} prompts for {total // length} videos")

    if needs_whole_video(reward):
        spans = [(v * length, (v + 1) * length) for v in range(total // length)]
    else:
        spans = [span for v in range(total // length) for span in _chunks(v * length, (v + 1) * length, max(1, batch_size))]
    device = module_device(reward) or torch.device("cpu")
    scores = torch.empty(total, dtype=torch.float32)
    for start, stop in spans:
        check_cancel()  # between batches: Cancel stops scoring before the next batch
        frames = images[start:stop].to(device=device, dtype=torch.float32).permute(0, 3, 1, 2)
        scores[start:stop] = reward(frames, [prompts[start // length]] * (stop - start)).float().cpu()
        if progress is not None:
            progress(stop, total)
    return scores


@dataclass(frozen=True)
class RankedVideo:
    index: int  # position among the candidates, 0-based
    score: float  # mean per-frame score
    frame_scores: tuple[float, ...]


def rank_videos(
    reward: Reward,
    images: torch.Tensor,
    frames_per_video: int,
    prompt: str | Sequence[str],
    batch_size: int = 8,
    progress: Progress | None = None,
) -> list[RankedVideo]:
    """Candidates laid out one after another along N -> all candidates, best (highest mean) first."""
    if frames_per_video < 1 or images.shape[0] % frames_per_video:
        raise ValueError(
            f"{images.shape[0]} frames cannot be split into videos of {frames_per_video} frames: "
            "the batch must hold candidates x frames_per_video frames"
        )
    scores = score_images(reward, images, prompt, batch_size, frames_per_video, progress)
    per_video = scores.reshape(-1, frames_per_video)
    ranked = [
        RankedVideo(index, float(row.mean()), tuple(float(s) for s in row)) for index, row in enumerate(per_video)
    ]
    # NaN (a diverged candidate) ranks last, never first; stable sort: ties keep the candidates' order.
    return sorted(ranked, key=lambda video: (math.isnan(video.score), -video.score))


def select_videos(images: torch.Tensor, frames_per_video: int, indices: Sequence[int]) -> torch.Tensor:
    """The frames of the given candidate videos, in the given order."""
    videos = images.reshape(-1, frames_per_video, *images.shape[1:])
    return videos[list(indices)].reshape(-1, *images.shape[1:])


def format_frame_scores(scores: Sequence[float]) -> str:
    return "\n".join(f"frame {i}: {s:.4f}" for i, s in enumerate(scores))


def format_ranking(ranked: Sequence[RankedVideo]) -> str:
    return "\n".join(f"rank {r + 1}: video {v.index} score {v.score:.4f}" for r, v in enumerate(ranked))
