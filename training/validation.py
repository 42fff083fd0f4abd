"""Validation videos: every `validation_every` steps (and at the end), whole videos of the
validation prompts at settings of their own (the official trainer validates at 512x512, cfg 7,
negative prompt "bad detailed", full videos), saved as MP4s in the run folder's validation/ and
scored with the run's reward (all frames, video by video). Under several processes each rank samples
its share of the prompts (so no rank idles at the next all-reduce for the whole validation) and
sends rank 0 the encoded MP4 and the score; rank 0 writes every file. The scores go to the history,
run.json, TensorBoard and validation/scores.json."""

from __future__ import annotations

import io
import json
import logging
from typing import Sequence

import numpy as np
import torch

from ..easyanimate.cancel import check_cancel
from ..fileio import write_bytes_atomic, write_text_atomic
from .distributed import SINGLE_PROCESS
from .rollout import ALL_FRAMES, PromptBank, RolloutSettings, frame_rewards, rollout_video

log = logging.getLogger(__name__)

VALIDATION_SEED_OFFSET = 2_000_000_011  # apart from the training and held-out seeds
VIDEO_FPS = 8
DEFAULT_VALIDATION_VIDEOS = 4  # without validation prompts: the first held-out prompts


def encode_mp4(video: torch.Tensor, fps: int = VIDEO_FPS) -> bytes:
    """(3, F, H, W) in [0, 1] -> the bytes of an H.264 MP4 (H and W even)."""
    import av

    frames = (video.detach().float().clamp(0, 1).permute(1, 2, 3, 0).cpu().numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()



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
    def run(self, pipe, reward, step: int, layout, dist=SINGLE_PROCESS, step_callback=None) -> float:
        """Sample and score this rank's share of the validation prompts; rank 0 (with a layout)
        writes every video and the scores. The mean score, on every rank."""
        cfg, bank = self.config, self.bank
        mine = []
        for index in dist.shard(len(self.prompts)):
            check_cancel()
            prompt = self.prompts[index]
            uncond = bank.uncond(1) if cfg.validation_cfg > 1 else None
            video = rollout_video(pipe, self.settings, bank.cond([prompt]), uncond,
                                  [cfg.seed + VALIDATION_SEED_OFFSET + index], (), step_callback=step_callback)
            score = frame_rewards(reward, video, [prompt], ALL_FRAMES).mean().item()
            mine.append((index, score, encode_mp4(video[0])))
        results = sorted(dist.gather_objects(mine))
        scores = [score for _, score, _ in results]
        if layout is not None and dist.is_main:
            for index, _, data in results:
                write_bytes_atomic(layout.validation_video(step, index), data)
            self._record(layout, step, scores)
        mean = float(np.mean(scores))
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
