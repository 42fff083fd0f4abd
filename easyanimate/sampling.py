"""The EasyAnimate sampling loop, written once for inference and for reward training.

`denoise` keeps autograd only on the steps listed in `grad_steps` (truncated backprop): on every
other step the transformer runs under no_grad, so no graph is built there. The scheduler update
itself stays differentiable, so gradients from later steps still flow back through the latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Container

import torch
import torch.nn.functional as F

from .model import EasyAnimateModel, EasyAnimatePipe
from .preflight import check_sampling
from .text import TextConditioning, encode_prompts

LATENT_CHANNELS = 16
INPAINT_NOISE_RATIO = 0.0563  # diffusers' EasyAnimate default noise augmentation of the start image

# Scheduler names a user can pick. Noise-prediction (V5, DDIM-trained) models take any of the
# first five; flow-matching (V5.1) models only the flow sampler.
NOISE_SCHEDULERS = {
    "DDIM": "DDIMScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler A": "EulerAncestralDiscreteScheduler",
    "DPM++": "DPMSolverMultistepScheduler",
    "PNDM": "PNDMScheduler",
}
FLOW_SCHEDULERS = {"Flow": "FlowMatchEulerDiscreteScheduler"}
SCHEDULER_CHOICES = ("auto",) + tuple(NOISE_SCHEDULERS) + tuple(FLOW_SCHEDULERS)

StepCallback = Callable[[int, int, torch.Tensor], None]


def is_flow_matching(pipe: EasyAnimatePipe) -> bool:
    return "FlowMatch" in pipe.scheduler_config.get("_class_name", "")


def make_scheduler(pipe: EasyAnimatePipe, name: str = "auto"):
    """A fresh scheduler (they are stateful) built from the folder's own scheduler config."""
    import diffusers

    flow = is_flow_matching(pipe)
    if name == "auto":
        class_name = pipe.scheduler_config.get("_class_name", "")
    elif name in FLOW_SCHEDULERS and flow:
        class_name = FLOW_SCHEDULERS[name]
    elif name in NOISE_SCHEDULERS and not flow:
        class_name = NOISE_SCHEDULERS[name]
    else:
        allowed = ["auto", *(FLOW_SCHEDULERS if flow else NOISE_SCHEDULERS)]
        raise ValueError(f"scheduler {name!r} does not fit this {'flow-matching' if flow else 'noise-prediction'} "
                         f"model ({pipe.version}); choose one of {', '.join(allowed)}")
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"unknown scheduler class {class_name!r} in {pipe.folder}/scheduler/scheduler_config.json")
    return cls.from_config(pipe.scheduler_config)


def set_timesteps(scheduler, steps: int, device) -> torch.Tensor:
    if getattr(scheduler.config, "use_dynamic_shifting", False):
        scheduler.set_timesteps(steps, device=device, mu=1)  # what EasyAnimate's pipelines pass
    else:
        scheduler.set_timesteps(steps, device=device)
    return scheduler.timesteps


def check_video_size(width: int, height: int, frames: int) -> None:
    if width % 16 or height % 16:
        raise ValueError(f"width and height must be multiples of 16 (VAE x8, patch x2); got {width}x{height}")
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"frames must be 1 + 4k (1, 5, 9, ..., 49) for the 4x temporal VAE; got {frames}")


def latent_shape(batch: int, width: int, height: int, frames: int) -> tuple[int, ...]:
    return (batch, LATENT_CHANNELS, (frames - 1) // 4 + 1, height // 8, width // 8)


def seeded_generator(seed: int, offset: int = 0) -> torch.Generator:
    """A CPU generator for `seed` (+ offset for the other random draws of the same video); wraps
    around at 2**64 like ComfyUI's seed widget, so its largest seeds work too."""
    return torch.Generator("cpu").manual_seed((int(seed) + offset) % 2**64)


def initial_noise(shape, seeds: list[int], device, dtype) -> torch.Tensor:
    """One CPU generator per video: a seed gives the same video on any device and in any batch."""
    noise = [torch.randn(shape[1:], generator=seeded_generator(s)) for s in seeds]
    return torch.stack(noise).to(device, dtype)


def _resize_first_frame_apart(mask: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    # The Magvit VAE encodes the first frame on its own; resize its mask apart from the rest.
    first = F.interpolate(mask[:, :, :1], size=(1, *size[1:]), mode="trilinear", align_corners=False)
    if size[0] == 1:
        return first
    rest = F.interpolate(mask[:, :, 1:], size=(size[0] - 1, *size[1:]), mode="trilinear", align_corners=False)
    return torch.cat([first, rest], dim=2)


@torch.no_grad()
def inpaint_condition(pipe: EasyAnimatePipe, shape, frames: int, start_images: torch.Tensor | None,
                      seeds: list[int]) -> torch.Tensor:
    """The 17 extra InP channels: 1 mask channel + 16 latents of the masked video.

    Text-to-video feeds zeros. Image-to-video keeps frame 0 (the start image) and masks the rest.
    """
    device, dtype = pipe.compute_device, pipe.dtype
    batch, _, lat_f, lat_h, lat_w = shape
    if start_images is None:
        return torch.zeros((batch, 1 + LATENT_CHANNELS, lat_f, lat_h, lat_w), device=device, dtype=dtype)
    height, width = lat_h * 8, lat_w * 8
    image = start_images.to(device, torch.float32)
    if image.shape[-2:] != (height, width):
        image = F.interpolate(image, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    image = image.clamp(0, 1) * 2 - 1
    video = torch.full((batch, 3, frames, height, width), -1.0, device=device)
    video[:, :, 0] = image.expand(batch, -1, -1, -1)
    keep = torch.zeros((batch, 1, frames, height, width), device=device)
    keep[:, :, 0] = 1.0
    vae = pipe.vae
    if getattr(pipe.transformer.config, "add_noise_in_inpaint_model", False):
        noise = torch.stack([torch.randn(video.shape[1:], generator=seeded_generator(s, 1))
                             for s in seeds]).to(device)
        video = torch.where(video == -1, video, video + INPAINT_NOISE_RATIO * noise)
    with pipe.placement.use(vae):
        masked_latents = vae.encode(video.to(dtype))[0].mode() * vae.config.scaling_factor
    mask_latents = _resize_first_frame_apart(keep, masked_latents.shape[2:]) * vae.config.scaling_factor
    return torch.cat([mask_latents.to(dtype), masked_latents.to(dtype)], dim=1)


def predict_noise(transformer, latents, t, cond: TextConditioning, inpaint, guidance_scale: float,
                  uncond: TextConditioning | None):
    """One transformer evaluation with classifier-free guidance (uncond first, as diffusers does)."""
    cfg = uncond is not None and guidance_scale > 1.0
    model_in = torch.cat([latents, latents]) if cfg else latents
    text = TextConditioning.cat([uncond, cond]) if cfg else cond
    extra = torch.cat([inpaint, inpaint]) if cfg else inpaint
    t_batch = t.expand(model_in.shape[0]).to(model_in.dtype)
    out = transformer(model_in, t_batch, encoder_hidden_states=text.embeds,
                      encoder_hidden_states_t5=text.embeds_t5, inpaint_latents=extra, return_dict=False)[0]
    if out.shape[1] != LATENT_CHANNELS:  # models that also predict variance
        out = out[:, :LATENT_CHANNELS]
    if cfg:
        uncond_out, cond_out = out.chunk(2)
        out = uncond_out + guidance_scale * (cond_out - uncond_out)
    return out


def denoise(transformer, scheduler, timesteps, latents: torch.Tensor, cond: TextConditioning,
            inpaint: torch.Tensor, guidance_scale: float, uncond: TextConditioning | None = None,
            grad_steps: Container[int] = (), detach_input: bool = False,
            step_callback: StepCallback | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Run the sampler from `latents` over `timesteps`.

    grad_steps: indices of the steps whose transformer call keeps a graph (training); empty for
    inference. detach_input: stop the gradient at the transformer's input on those steps (DRTune),
    so each step's gradient reaches the LoRA without travelling back through earlier steps' inputs.
    """
    total = len(timesteps)
    step_kwargs = {"generator": generator} if generator is not None and _accepts_generator(scheduler) else {}
    for i, t in enumerate(timesteps):
        keep_graph = i in grad_steps and torch.is_grad_enabled()
        model_in = latents
        if hasattr(scheduler, "scale_model_input"):
            model_in = scheduler.scale_model_input(model_in, t)
        if keep_graph:
            noise_pred = predict_noise(transformer, model_in.detach() if detach_input else model_in, t, cond,
                                       inpaint, guidance_scale, uncond)
        else:
            with torch.no_grad():
                noise_pred = predict_noise(transformer, model_in, t, cond, inpaint, guidance_scale, uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False, **step_kwargs)[0]
        if step_callback is not None:
            step_callback(i + 1, total, latents)
    return latents


def _accepts_generator(scheduler) -> bool:
    import inspect

    return "generator" in inspect.signature(scheduler.step).parameters


def decode_latents(pipe: EasyAnimatePipe, latents: torch.Tensor, num_latents: int | None = None) -> torch.Tensor:
    """Latents -> video (B, 3, F, H, W) in [0, 1]. `num_latents` decodes only the first few
    (1 latent = the first frame; k latents = 1 + 4(k-1) frames): what reward training needs."""
    vae = pipe.vae
    if num_latents is not None:
        latents = latents[:, :, :num_latents]
    with pipe.placement.use(vae):
        video = vae.decode((latents / vae.config.scaling_factor).to(pipe.dtype), return_dict=False)[0]
    return (video.float() / 2 + 0.5).clamp(0, 1)


@dataclass
class SampleRequest:
    prompt: str
    negative_prompt: str = ""
    width: int = 384
    height: int = 384
    frames: int = 25
    steps: int = 30
    guidance_scale: float = 6.0
    seed: int = 0
    videos: int = 1
    scheduler: str = "auto"
    start_image: torch.Tensor | None = None  # (3, H, W) or (1, 3, H, W) in [0, 1]: image-to-video


def sync_loras(model: EasyAnimateModel) -> None:
    """Make the shared transformer compute the LoRA stack this model carries (no-op if none ever)."""
    if not model.loras and model.pipe.lora_patcher is None:
        return
    from .lora_patch import get_patcher

    get_patcher(model.pipe).sync(model.pipe.transformer, model.loras)


def encode_request_prompts(pipe: EasyAnimatePipe, prompt: str, negative_prompt: str, guidance_scale: float
                           ) -> tuple[TextConditioning, TextConditioning | None]:
    """Prompt and (with CFG) negative prompt in one pass: the text encoders move in once."""
    use_cfg = guidance_scale > 1
    encoded = encode_prompts(pipe, [prompt, negative_prompt] if use_cfg else [prompt]).to(pipe.compute_device,
                                                                                         pipe.dtype)
    if not use_cfg:
        return encoded, None
    t5 = encoded.embeds_t5
    cond = TextConditioning(encoded.embeds[:1], None if t5 is None else t5[:1])
    uncond = TextConditioning(encoded.embeds[1:], None if t5 is None else t5[1:])
    return cond, uncond


@torch.no_grad()
def sample_video(model: EasyAnimateModel, request: SampleRequest, step_callback: StepCallback | None = None,
                 text: tuple[TextConditioning, TextConditioning | None] | None = None) -> torch.Tensor:
    """Text/image-to-video. Returns frames (videos * F, H, W, 3) in [0, 1], videos one after another.

    `text`: (cond, uncond) from `encode_request_prompts`, when the caller samples the same prompts
    several times (a strength sweep) and encodes them once. Each big module moves in once per call:
    the VAE to encode start images, then the transformer for every video, then the VAE to decode.
    """
    pipe = model.pipe
    check_video_size(request.width, request.height, request.frames)
    if request.steps < 1:
        raise ValueError("steps must be at least 1")
    check_sampling(pipe, request.width, request.height, request.frames, request.videos, request.guidance_scale,
                   request.start_image is not None)  # refuse before allocating (easyanimate/preflight.py)
    device = pipe.compute_device
    seeds = [request.seed + i for i in range(request.videos)]
    cond, uncond = text or encode_request_prompts(pipe, request.prompt, request.negative_prompt,
                                                  request.guidance_scale)
    shape = latent_shape(1, request.width, request.height, request.frames)
    start = request.start_image
    if start is not None and start.ndim == 3:
        start = start[None]
    with pipe.placement.use(pipe.vae if start is not None else None):
        inpaints = [inpaint_condition(pipe, shape, request.frames, start, [seed]) for seed in seeds]
    sync_loras(model)
    total = request.steps * len(seeds)
    latents_per_video = []
    with pipe.placement.use(pipe.transformer):
        for v, (seed, inpaint) in enumerate(zip(seeds, inpaints)):
            scheduler = make_scheduler(pipe, request.scheduler)
            timesteps = set_timesteps(scheduler, request.steps, device)
            latents = initial_noise(shape, [seed], device, pipe.dtype) * getattr(scheduler, "init_noise_sigma", 1.0)
            callback = None
            if step_callback is not None:
                done = v * request.steps
                callback = lambda i, n, x, done=done: step_callback(done + i, total, x)  # noqa: E731
            latents_per_video.append(denoise(pipe.transformer, scheduler, timesteps, latents, cond, inpaint,
                                             request.guidance_scale, uncond, step_callback=callback,
                                             generator=seeded_generator(seed, 2)))
    with pipe.placement.use(pipe.vae):
        videos = [decode_latents(pipe, latents)[0] for latents in latents_per_video]
    return torch.cat([video.permute(1, 2, 3, 0).float().cpu() for video in videos])  # (F, H, W, 3) each
