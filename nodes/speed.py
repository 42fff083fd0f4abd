"""Sampler inputs for the flow shift and the inference speed-ups, and the live latent preview sent
with the progress bar (shared by the nodes that sample)."""

from __future__ import annotations

from comfy_api.latest import io

from ..easyanimate.schedulers import MAX_SHIFT
from ..easyanimate.step_cache import DEFAULT_TEACACHE_THRESHOLD

PREVIEW_EVERY = 5


def speed_inputs(preview: bool = True) -> list:
    """Optional inputs appended after a sampler's own (old workflows keep their defaults)."""
    inputs = [
        io.Float.Input("shift", default=0.0, min=0.0, max=MAX_SHIFT, step=0.1, optional=True,
                       tooltip="Flow-matching (V5.1) models: the noise schedule's shift for Flow, Flow UniPC and "
                               "Flow DPM++. 0 = the model folder's own schedule. Higher spends more steps at high "
                               "noise (VideoX-Fun suggests 3 for 480p, 5 for 720p). Must be 0 on V5 models."),
        io.Boolean.Input("teacache", default=False, optional=True,
                         tooltip="TeaCache: skip the transformer on steps whose input barely changed and reuse the "
                                 "previous step's residual. Faster, slightly different video."),
        io.Float.Input("teacache_threshold", default=DEFAULT_TEACACHE_THRESHOLD, min=0.0, max=1.0, step=0.005,
                       optional=True,
                       tooltip="TeaCache: the accumulated estimated change below which a step is skipped. Higher "
                               "skips more (the official nodes use 0.10; 0.05-0.15 keeps quality)."),
        io.Float.Input("cfg_skip_ratio", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                       tooltip="Skip the negative-prompt (unconditional) branch for this last fraction of the steps: "
                               "those steps cost half. 0 = off; 0.1-0.25 is usually invisible."),
    ]
    if preview:
        inputs.append(io.Int.Input("preview_every", default=PREVIEW_EVERY, min=0, max=1000, optional=True,
                                   tooltip="Send a latent preview with the progress bar every N steps (0 = never). "
                                           "A cheap latent-to-RGB projection fitted once from the model's own VAE."))
    return inputs


def latent_previewer(pipe, every: int):
    """(done, total, denoised latents) -> a ComfyUI preview tuple ("JPEG", PIL image, max size), the
    format ComfyUI 0.3.75's ProgressBar hook sends (latent_preview.py), every `every` steps and at the
    last one, else None. None when previews are off."""
    if not every:
        return None
    from PIL import Image

    from ..easyanimate.preview import fit_latent_rgb, preview_frames

    try:
        from comfy.cli_args import args

        max_size = int(args.preview_size)
    except Exception:  # noqa: BLE001 - an older host without the flag
        max_size = 512

    def make(done: int, total: int, latents):
        if latents is None or (done % every and done != total):
            return None
        projection = fit_latent_rgb(pipe)  # at the first preview (after the inputs were checked), then cached
        return "JPEG", Image.fromarray(preview_frames(latents, projection).numpy()), max_size

    return make
