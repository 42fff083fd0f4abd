"""LoRA strength sweep: one prompt and seed sampled at several strengths, each video scored by a reward."""

from __future__ import annotations

import math
import re

import folder_paths
import torch
from comfy_api.latest import io

from ..easyanimate.cancel import check_cancel
from ..easyanimate.lora_format import MAX_STRENGTH
from ..easyanimate.lora_patch import DEFAULT_MODE, MODES
from ..easyanimate.sampling import (
    SCHEDULER_CHOICES, SampleRequest, check_guidance, check_video_size, encode_request_prompts, sample_video)
from ..reward.plot import plot_series
from ..reward.scoring import score_images
from .common import LORA_FOLDER, lora_file_names, progress_callback
from .lora_nodes import cached_lora
from .types import EasyAnimateModelType, RewardModelType


# A plain decimal number (no nan/inf words, no Python digit separators like "1_0").
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


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


def format_sweep(strengths: list[float], means: list[float], reward_name: str) -> str:
    lines = [f"{reward_name} mean frame score by LoRA strength:"]
    lines += [f"strength {s:g}: {m:.4f}" for s, m in zip(strengths, means)]
    best = max(range(len(means)), key=lambda i: means[i])
    lines.append(f"best: strength {strengths[best]:g}")
    return "\n".join(lines)


class EasyAnimateStrengthSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateReward_StrengthSweep",
            hidden=[io.Hidden.unique_id],  # cls.hidden.unique_id: progress bar and text on this node
            display_name="EasyAnimate LoRA Strength Sweep",
            category="EasyAnimate/lora",
            description="Samples the same prompt and seed once per LoRA strength, scores every video with a reward "
                        "and plots the mean reward against the strength. The model is patched in place for each "
                        "strength (no reload).",
            inputs=[
                EasyAnimateModelType.Input("model"),
                io.Combo.Input("lora_name", options=lora_file_names(),
                               tooltip="The LoRA to sweep (models/loras)."),
                RewardModelType.Input("reward"),
                io.String.Input("prompt", multiline=True, default="A cat playing the piano in a sunny room."),
                io.String.Input("negative_prompt", multiline=True, default=""),
                io.String.Input("strengths", default="0,0.25,0.5,0.75,1",
                                tooltip="LoRA strengths to sample, separated by commas; 0 is the base model."),
                io.Int.Input("width", default=384, min=16, max=2048, step=16),
                io.Int.Input("height", default=384, min=16, max=2048, step=16),
                io.Int.Input("frames", default=25, min=1, max=145, step=4, tooltip="1 + 4k frames."),
                io.Int.Input("steps", default=30, min=1, max=200),
                io.Float.Input("cfg", default=6.0, min=1.0, max=20.0, step=0.1),
                io.Int.Input("seed", default=43, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The same seed for every strength, so only the LoRA changes."),
                io.Combo.Input("scheduler", options=list(SCHEDULER_CHOICES), default="auto"),
                io.Combo.Input("mode", options=list(MODES), default=DEFAULT_MODE,
                               tooltip="How the LoRA is patched in (see EasyAnimate Apply LoRA)."),
                io.Int.Input("batch_size", default=8, min=1, max=256, tooltip="Frames scored at once."),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="All strengths' videos, one after another."),
                io.String.Output(display_name="scores"),
                io.Image.Output(display_name="plot"),
            ],
        )

    @classmethod
    def execute(cls, model, lora_name, reward, prompt, negative_prompt, strengths, width, height, frames, steps,
                cfg, seed, scheduler, mode, batch_size) -> io.NodeOutput:
        check_video_size(width, height, frames)
        check_guidance(cfg)
        values = parse_strengths(strengths)
        weights = cached_lora(folder_paths.get_full_path_or_raise(LORA_FOLDER, lora_name), model.pipe.transformer)
        request = SampleRequest(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                                frames=frames, steps=steps, guidance_scale=cfg, seed=seed, videos=1,
                                scheduler=scheduler)
        on_step = progress_callback(steps * len(values), cls.hidden.unique_id if cls.hidden else None)
        text = encode_request_prompts(model.pipe, prompt, negative_prompt, cfg)  # once for every strength
        videos, means = [], []
        for number, strength in enumerate(values):
            check_cancel()  # before each strength: Cancel stops the sweep between videos
            variant = model if strength == 0 else model.with_lora(weights.with_mode(mode), strength, lora_name)
            offset = number * steps
            video = sample_video(variant, request, lambda i, n, x=None, o=offset: on_step(o + i, steps * len(values)),
                                 text=text)
            check_cancel()
            means.append(float(score_images(reward, video, prompt, batch_size).mean()))
            videos.append(video)
        label = " | ".join(f"{s:g}" for s in values)
        plot = plot_series({reward.name: means}, f"{reward.name} vs LoRA strength ({lora_name})",
                           f"strength: {label}", "mean reward")
        return io.NodeOutput(torch.cat(videos), format_sweep(values, means, reward.name), plot)


NODES = [EasyAnimateStrengthSweep]
