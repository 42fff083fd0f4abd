"""LoRA strength sweep: one prompt and seed sampled at several LoRA strengths, each video scored.

Plain Python (no ComfyUI): the Strength Sweep node is a thin adapter over `strength_sweep`, and a
script can call it directly:

    from easyanimate_reward.reward.scoring import score_images
    result = strength_sweep(model, "my_lora.safetensors", "0, 0.3, 1", request,
                            score=lambda video: float(score_images(reward, video, request.prompt, 8).mean()))
    print(result.text(reward.name)); result.plot(reward.name)

The model is patched in place for each strength (no reload); the prompts are encoded once.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from .cancel import check_cancel
from .lora_cache import cached_lora
from .lora_format import MAX_STRENGTH, LoraWeights
from .lora_patch import DEFAULT_MODE
from .model import EasyAnimateModel
from .sampling import SampleRequest, check_guidance, check_video_size, encode_request_prompts, sample_video

# A plain decimal number (no nan/inf words, no Python digit separators like "1_0").
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")

# (done, total) over all strengths' steps together.
Progress = Callable[[int, int], None]


def parse_strengths(text: str) -> list[float]:
    """"0, 0.25, 0.5" -> [0.0, 0.25, 0.5]; commas or spaces separate values. Every value is a
    plain finite number within the Apply LoRA node's range (+-MAX_STRENGTH)."""
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise ValueError("strengths: give at least one number, e.g. '0,0.25,0.5,0.75,1'")
    values = []
    for part in parts:
        value = float(part) if _NUMBER.match(part) else math.nan
        if not _NUMBER.match(part) or not math.isfinite(value):
            raise ValueError(f"strengths {text!r}: {part!r} is not a plain finite number (e.g. 0.5 or -1)")
        if abs(value) > MAX_STRENGTH:
            raise ValueError(f"strengths {text!r}: {part} is outside the LoRA strength range "
                             f"-{MAX_STRENGTH:g}..{MAX_STRENGTH:g}")
        values.append(value)
    return values


@dataclass
class SweepResult:
    strengths: list[float]
    means: list[float]  # the score of each strength's video
    videos: list[torch.Tensor]  # (F, H, W, 3) each, in strength order
    lora_name: str = ""

    @property
    def best(self) -> float:
        return self.strengths[max(range(len(self.means)), key=lambda i: self.means[i])]

    def frames(self) -> torch.Tensor:
        return torch.cat(self.videos)

    def text(self, reward_name: str) -> str:
        lines = [f"{reward_name} mean frame score by LoRA strength:"]
        lines += [f"strength {s:g}: {m:.4f}" for s, m in zip(self.strengths, self.means)]
        lines.append(f"best: strength {self.best:g}")
        return "\n".join(lines)

    def plot(self, reward_name: str) -> torch.Tensor:
        """Mean reward against strength, each point at its strength (uneven lists stay uneven), the
        strengths as the x tick labels."""
        from ..reward.plot import plot_series

        title = f"{reward_name} vs LoRA strength" + (f" ({self.lora_name})" if self.lora_name else "")
        return plot_series({reward_name: self.means}, title, "LoRA strength", "mean reward", x=self.strengths)


def strength_sweep(model: EasyAnimateModel, lora: str | os.PathLike | LoraWeights, strengths: str | Sequence[float],
                   request: SampleRequest, score: Callable[[torch.Tensor], float], mode: str = DEFAULT_MODE,
                   progress: Progress | None = None, lora_name: str | None = None) -> SweepResult:
    """Sample `request` (one video) at each strength of `lora` on `model` and score each video with
    `score(frames) -> float`. Strength 0 is the model as given.

    `lora`: a LoRA file (read through lora_cache.LORA_CACHE) or parsed weights. `strengths`: numbers,
    or text such as "0, 0.3, 1" (parse_strengths). The size, cfg and strengths are checked before
    any work (the LoRA is read after them); Cancel (cancel.check_cancel) stops between videos."""
    check_video_size(request.width, request.height, request.frames)
    check_guidance(request.guidance_scale)
    values = parse_strengths(strengths) if isinstance(strengths, str) else [float(s) for s in strengths]
    if not values:
        raise ValueError("strength sweep: give at least one strength")
    if isinstance(lora, LoraWeights):
        weights = lora
    else:
        weights = cached_lora(lora, model.pipe.transformer)
        lora_name = lora_name or os.path.basename(os.fspath(lora))
    lora_name = lora_name or "lora"
    request = replace(request, videos=1)
    total = request.steps * len(values)
    text = encode_request_prompts(model.pipe, request.prompt, request.negative_prompt, request.guidance_scale)
    videos, means = [], []
    for number, strength in enumerate(values):
        check_cancel()  # before each strength: Cancel stops the sweep between videos
        variant = model if strength == 0 else model.with_lora(weights.with_mode(mode), strength, lora_name)
        offset = number * request.steps

        def on_step(done, _total, _latest=None, offset=offset):
            if progress is not None:
                progress(offset + done, total)

        video = sample_video(variant, request, on_step, text=text)
        check_cancel()
        means.append(float(score(video)))
        videos.append(video)
    return SweepResult(values, means, videos, lora_name)
