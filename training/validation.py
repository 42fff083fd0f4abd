"""Validation videos: every `validation_every` steps (and at the end), whole videos of the
validation prompts at settings of their own (the official trainer validates at 512x512, cfg 7,
negative prompt "bad detailed", full videos), saved as MP4s in the run folder's validation/ and
scored with the run's reward (all frames, video by video). Rank 0 samples them; the scores go to
the history, run.json, TensorBoard and validation/scores.json."""

from __future__ import annotations

import json
import logging
from typing import Sequence

import numpy as np
import torch

from ..easyanimate.cancel import check_cancel
from ..fileio import atomic_file, write_text_atomic
from .rollout import ALL_FRAMES, PromptBank, RolloutSettings, frame_rewards, rollout_video

log = logging.getLogger(__name__)

VALIDATION_SEED_OFFSET = 2_000_000_011  # apart from the training and held-out seeds
VIDEO_FPS = 8
DEFAULT_VALIDATION_VIDEOS = 4  # without validation prompts: the first held-out prompts


def write_mp4(path, video: torch.Tensor, fps: int = VIDEO_FPS) -> None:
    """(3, F, H, W) in [0, 1] -> an H.264 MP4, written atomically (H and W even)."""
    import av

    frames = (video.detach().float().clamp(0, 1).permute(1, 2, 3, 0).cpu().numpy() * 255).round().astype(np.uint8)
    with atomic_file(path, suffix=".mp4") as tmp:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def validation_settings(config) -> RolloutSettings:
    latents = (config.validation_frames - 1) // 4 + 1
    return RolloutSettings(config.validation_width, config.validation_height, config.validation_frames,
                           config.validation_steps, config.validation_cfg, config.scheduler, latents, ALL_FRAMES,
                           config.shift)


class ValidationVideos:
    def __init__(self, config, prompts: Sequence[str]):
        self.config = config
        self.prompts = list(prompts)
        self.settings = validation_settings(config)
        self.bank: PromptBank | None = None

    @property
    def enabled(self) -> bool:
        return self.config.validation_every > 0 and bool(self.prompts)

    def due(self, step: int, last_step: int) -> bool:
        return self.enabled and (step % self.config.validation_every == 0 or step == last_step)

    def prepare(self, pipe) -> None:
        """Encode the validation prompts and their negative prompt once."""
        if self.enabled and self.bank is None:
            self.bank = PromptBank(pipe, self.prompts, self.config.validation_negative_prompt)

    def close(self) -> None:
        if self.bank is not None:
            self.bank.store.close()

    @torch.no_grad()
    def run(self, pipe, reward, step: int, layout, step_callback=None) -> float:
        """Sample, save and score every validation prompt; the mean score."""
        cfg, bank = self.config, self.bank
        scores = []
        for index, prompt in enumerate(self.prompts):
            check_cancel()
            uncond = bank.uncond(1) if cfg.validation_cfg > 1 else None
            video = rollout_video(pipe, self.settings, bank.cond([prompt]), uncond,
                                  [cfg.seed + VALIDATION_SEED_OFFSET + index], (), step_callback=step_callback)
            scores.append(frame_rewards(reward, video, [prompt], ALL_FRAMES).mean().item())
            if layout is not None:
                write_mp4(layout.validation_video(step, index), video[0])
        mean = float(np.mean(scores))
        if layout is not None:
            self._record(layout, step, scores)
        log.info("validation at step %d: mean reward %.5g over %d videos", step, mean, len(scores))
        return mean

    def _record(self, layout, step: int, scores: list[float]) -> None:
        path = layout.validation_scores
        try:
            record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError):
            record = {}
        record[str(step)] = {"mean": float(np.mean(scores)),
                             "videos": {layout.validation_video(step, i).name: {"prompt": p, "reward": s}
                                        for i, (p, s) in enumerate(zip(self.prompts, scores))}}
        write_text_atomic(path, json.dumps(record, indent=1, sort_keys=True))
