"""The sampling inputs that the sampler and the LoRA strength sweep share: one table, so names,
defaults, ranges and tooltips are the same on both nodes, and one mapping to SampleRequest fields."""

from __future__ import annotations

from comfy_api.latest import io

from ..easyanimate.sampling import SCHEDULER_CHOICES

DEFAULT_PROMPT = "A cat playing the piano in a sunny room."


def _size(name: str):
    return io.Int.Input(name, default=384, min=16, max=2048, step=16, tooltip="Multiple of 16.")


# name -> a function making the input (a fresh object for every schema).
SAMPLER_INPUTS = {
    "prompt": lambda: io.String.Input("prompt", multiline=True, default=DEFAULT_PROMPT, tooltip="What the video shows."),
    "negative_prompt": lambda: io.String.Input("negative_prompt", multiline=True, default="",
                                               tooltip="What to steer away from (used when cfg > 1)."),
    "width": lambda: _size("width"),
    "height": lambda: _size("height"),
    "frames": lambda: io.Int.Input("frames", default=25, min=1, max=145, step=4,
                                   tooltip="1 + 4k frames (1, 5, 9, ... 49): the VAE compresses time by 4."),
    "steps": lambda: io.Int.Input("steps", default=30, min=1, max=200, tooltip="Denoising steps."),
    "cfg": lambda: io.Float.Input("cfg", default=6.0, min=1.0, max=20.0, step=0.1,
                                  tooltip="Classifier-free guidance scale; 1 disables guidance."),
    "seed": lambda: io.Int.Input("seed", default=43, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                                 tooltip="The noise seed: the same seed gives the same video. With several videos, "
                                         "video i gets seed + i (a seed gives the same video in any batch)."),
    "scheduler": lambda: io.Combo.Input(
        "scheduler", options=list(SCHEDULER_CHOICES), default="auto",
        tooltip="auto: the model folder's own scheduler. V5 (noise prediction): DDIM, Euler, Euler A, DPM++, PNDM "
                "(4 steps or more). V5.1 (flow matching): Flow (Euler), Flow UniPC, Flow DPM++ (multistep: good at "
                "20-30 steps)."),
    "videos": lambda: io.Int.Input("videos", default=1, min=1, max=64,
                                   tooltip="How many videos (seeds) to sample; e.g. candidates for best-of-N ranking."),
}

# Node input -> SampleRequest field, where the names differ.
_REQUEST_NAMES = {"cfg": "guidance_scale"}


def sampler_inputs(*names: str) -> list:
    """The shared inputs `names`, in that order."""
    return [SAMPLER_INPUTS[name]() for name in names]


def request_fields(**values) -> dict:
    """SampleRequest keyword arguments from the node's values of the shared inputs (others pass through)."""
    return {_REQUEST_NAMES.get(name, name): value for name, value in values.items()}
