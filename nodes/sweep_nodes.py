"""LoRA strength sweep node: a thin adapter over easyanimate/sweep.py (one prompt and seed sampled at
several strengths, each video scored by a reward)."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..easyanimate.lora_patch import DEFAULT_MODE, MODES
from ..easyanimate.sampling import SampleRequest
from ..easyanimate.sweep import parse_strengths, strength_sweep
from ..reward.scoring import score_images
from .common import LORA_FOLDER, lora_file_names, progress_callback
from .lora_nodes import MODE_TOOLTIP
from .sampler_inputs import request_fields, sampler_inputs
from .schema import (image_output, model_input, node_id, node_schema, reward_input, scoring_batch_input, shown,
                     text_output)

VIDEO_FIELDS = ("width", "height", "frames", "steps", "cfg", "seed", "scheduler")


class EasyAnimateStrengthSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "StrengthSweep", "EasyAnimate LoRA Strength Sweep", "EasyAnimate/lora",
            "Samples the same prompt and seed once per LoRA strength, scores every video with a reward and plots the "
            "mean reward against the strength. The model is patched in place for each strength (no reload).",
            inputs=[
                model_input("The model the LoRA is swept on (strength 0 is this model as it is)."),
                io.Combo.Input("lora_name", options=lora_file_names(), tooltip="The LoRA to sweep (models/loras)."),
                reward_input("The reward that scores every strength's video (mean over its frames)."),
                *sampler_inputs("prompt", "negative_prompt"),
                io.String.Input("strengths", default="0,0.25,0.5,0.75,1",
                                tooltip="LoRA strengths to sample, separated by commas; 0 is the base model."),
                *sampler_inputs(*VIDEO_FIELDS),
                io.Combo.Input("mode", options=list(MODES), default=DEFAULT_MODE, tooltip=MODE_TOOLTIP),
                scoring_batch_input(),
            ],
            outputs=[
                image_output("frames", "All strengths' videos, one after another, in the order of `strengths`."),
                text_output("scores", "The mean reward of each strength and the best strength."),
                image_output("plot", "Mean reward against LoRA strength (points at their strengths)."),
            ],
            output_node=True,
            node_id_input=True,
        )

    @classmethod
    def execute(cls, model, lora_name, reward, prompt, negative_prompt, strengths, width, height, frames, steps,
                cfg, seed, scheduler, mode, batch_size) -> io.NodeOutput:
        request = SampleRequest(**request_fields(prompt=prompt, negative_prompt=negative_prompt, width=width,
                                                 height=height, frames=frames, steps=steps, cfg=cfg, seed=seed,
                                                 scheduler=scheduler))
        path = folder_paths.get_full_path_or_raise(LORA_FOLDER, lora_name)
        result = strength_sweep(
            model, path, strengths, request, mode=mode, lora_name=lora_name,
            score=lambda video: float(score_images(reward, video, prompt, batch_size).mean()),
            progress=progress_callback(steps * len(parse_strengths(strengths)), node_id(cls)))
        text = result.text(reward.name)
        return shown(result.frames(), text, result.plot(reward.name), text=text, node=node_id(cls))


NODES = [EasyAnimateStrengthSweep]
