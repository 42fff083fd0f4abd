"""The EasyAnimate sampling loop, written once for inference and for reward training.

`denoise` keeps autograd only on the steps listed in `grad_steps` (truncated backprop): on every
other step the transformer runs under no_grad, so no graph is built there. The scheduler update
itself stays differentiable, so gradients from later steps still flow back through the latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Container

import torch

from . import conditioning
from .buckets import resolve_size
from .cancel import check_cancel
from .conditioning import INPAINT_NOISE_RATIO, LATENT_CHANNELS, rescale_guidance, transformer_kwargs  # noqa: F401
from .conditioning import seeded_generator
from .model import EasyAnimateModel, EasyAnimatePipe
from .preflight import check_sampling
from .schedulers import FLOW_SCHEDULERS, NOISE_SCHEDULERS, SCHEDULER_CHOICES  # noqa: F401 (re-exported)
from .schedulers import build_scheduler, check_shift, check_steps
from .preview import denoised_estimate
from .step_cache import DEFAULT_TEACACHE_THRESHOLD, LoopSpeedups, SpeedSettings
from .text import TextConditioning, encode_prompts
from .vae import vae_budget, vae_decode, vae_encode_mode


StepCallback = Callable[[int, int, torch.Tensor], None]


def is_flow_matching(pipe: EasyAnimatePipe) -> bool:
    return "FlowMatch" in pipe.scheduler_config.get("_class_name", "")


def make_scheduler(pipe: EasyAnimatePipe, name: str = "auto", shift: float = 0.0):
    """A fresh scheduler (they are stateful) built from the folder's own scheduler config.
    `shift`: flow-matching models only, 0 = the folder's own (easyanimate/schedulers.py)."""
    flow = is_flow_matching(pipe)
    check_shift(shift, flow)
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
    try:
        return build_scheduler(class_name, pipe.scheduler_config, flow, shift)
    except ValueError as e:
        raise ValueError(f"{e} (scheduler {name!r}, {pipe.folder}/scheduler/scheduler_config.json)") from None


def set_timesteps(scheduler, steps: int, device) -> torch.Tensor:
    """Set the schedule for `steps` steps; refuses a count the scheduler cannot run (schedulers.check_steps)."""
    check_steps(scheduler, steps)
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


@dataclass(frozen=True)
class VideoSize:
    """The size of a video the pipeline makes: what a SampleRequest, the trainer's config and its
    rollout settings all carry as width / height / frames fields. `VideoSize.of(x)` reads them off
    any such object; `check()` refuses a size the VAE and the transformer's patches cannot make."""

    width: int
    height: int
    frames: int

    @classmethod
    def of(cls, settings) -> "VideoSize":
        return cls(settings.width, settings.height, settings.frames)

    def check(self) -> "VideoSize":
        check_video_size(self.width, self.height, self.frames)
        return self

    def latent_shape(self, batch: int, vae=None) -> tuple[int, ...]:
        return latent_shape(batch, self.width, self.height, self.frames, vae)


def check_guidance(guidance_scale: float) -> None:
    """cfg must be a finite number: NaN compares False with everything and would silently turn
    classifier-free guidance off."""
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(float(guidance_scale)):
        raise ValueError(f"cfg (guidance scale) must be a finite number, got {guidance_scale!r}")


def latent_shape(batch: int, width: int, height: int, frames: int, vae=None) -> tuple[int, ...]:
    """(B, C, F', H', W') of the latents of a video. From `vae` (an AutoencoderKLMagvit) its own
    compression ratios and latent channels; without one the Magvit's of every EasyAnimate V5 / V5.1
    model: 16 channels, 8x spatial, 4x temporal (the first frame apart)."""
    if vae is None:
        spatial, temporal, channels = 8, 4, LATENT_CHANNELS
    else:
        spatial, temporal, channels = vae.spatial_compression_ratio, vae.temporal_compression_ratio, vae.config.latent_channels
    return (batch, channels, (frames - 1) // temporal + 1, height // spatial, width // spatial)


def initial_noise(shape, seeds: list[int], device, dtype) -> torch.Tensor:
    """One CPU generator per video: a seed gives the same video on any device and in any batch."""
    return conditioning.seeded_noise(shape, seeds, device, dtype)


@torch.no_grad()
def inpaint_condition(pipe: EasyAnimatePipe, shape, frames: int, start_images: torch.Tensor | None,
                      seeds: list[int], end_images: torch.Tensor | None = None):
    """The transformer's extra inputs for text- or image-to-video (see easyanimate/conditioning.py).

    InP models: 1 mask channel + 16 latents of the masked video; zeros for text-to-video, frame 0
    kept for a start image (and the last frame for an end image). Other kinds: their zero
    conditioning (None for text-to-video models); images are refused there.
    """
    if start_images is None and end_images is None:
        return conditioning.empty_condition(pipe, shape)
    inputs = conditioning.model_inputs(pipe)
    if inputs.kind != conditioning.INPAINT:
        raise ValueError(f"start/end images cannot be used with this {inputs.describe()}")
    return conditioning.inpaint_latents(pipe, shape, frames, start_images, seeds, end_images)


def predict_noise(transformer, latents, t, cond: TextConditioning, inpaint, guidance_scale: float,
                  uncond: TextConditioning | None, speed: LoopSpeedups | None = None,
                  guidance_rescale: float = 0.0):
    """One transformer evaluation with classifier-free guidance (uncond first, as diffusers does).
    `inpaint`: the extra inputs (conditioning.Condition, a bare InP tensor, or None).
    `speed`: the loop's TeaCache / cfg-skip state (easyanimate/step_cache.py), None = plain."""
    cfg = uncond is not None and guidance_scale > 1.0 and not (speed is not None and speed.skip_uncond())
    model_in = torch.cat([latents, latents]) if cfg else latents
    text = TextConditioning.cat([uncond, cond]) if cfg else cond
    t_batch = t.expand(model_in.shape[0]).to(model_in.dtype)
    forward = transformer if speed is None else speed.forward
    out = forward(model_in, t_batch, encoder_hidden_states=text.embeds, encoder_hidden_states_t5=text.embeds_t5,
                  **transformer_kwargs(inpaint, 2 if cfg else 1), return_dict=False)[0]
    if out.shape[1] != LATENT_CHANNELS:  # models that also predict variance
        out = out[:, :LATENT_CHANNELS]
    if cfg:
        uncond_out, cond_out = out.chunk(2)
        out = rescale_guidance(uncond_out + guidance_scale * (cond_out - uncond_out), cond_out, guidance_rescale)
    return out


def denoise(transformer, scheduler, timesteps, latents: torch.Tensor, cond: TextConditioning,
            inpaint: torch.Tensor, guidance_scale: float, uncond: TextConditioning | None = None,
            grad_steps: Container[int] = (), detach_input: bool = False,
            step_callback: StepCallback | None = None,
            generator: torch.Generator | list[torch.Generator] | None = None,
            speed: SpeedSettings | None = None, guidance_rescale: float = 0.0, eta: float = 0.0) -> torch.Tensor:
    """Run the sampler from `latents` over `timesteps`.

    grad_steps: indices of the steps whose transformer call keeps a graph (training); empty for
    inference. detach_input: stop the gradient at the transformer's input on those steps (DRTune),
    so each step's gradient reaches the LoRA without travelling back through earlier steps' inputs.
    generator: one per video of the batch (a list), so a seed's stochastic steps (Euler A, DDIM
    eta > 0) draw the same noise in any batch. speed: TeaCache / cfg-skip (off when None).
    eta: DDIM's eta (0: deterministic); refused for schedulers that take none.
    step_callback(done, total, denoised): `denoised` is the current estimate of the clean latents.
    """
    total = len(timesteps)
    step_kwargs = {"generator": generator} if generator is not None and _step_takes(scheduler, "generator") else {}
    if eta:
        if not _step_takes(scheduler, "eta"):
            raise ValueError(f"eta {eta:g} is a DDIM setting; the {type(scheduler).__name__} sampler takes none "
                             "(use eta 0 or the DDIM scheduler)")
        step_kwargs["eta"] = eta
    loop = LoopSpeedups(transformer, speed, total) if speed is not None and speed.active else None
    for i, t in enumerate(timesteps):
        check_cancel()  # between sampling steps
        keep_graph = i in grad_steps and torch.is_grad_enabled()
        if loop is not None:
            loop.begin(i, keep_graph)
        model_in = latents
        if hasattr(scheduler, "scale_model_input"):
            model_in = scheduler.scale_model_input(model_in, t)
        if keep_graph:
            noise_pred = predict_noise(transformer, model_in.detach() if detach_input else model_in, t, cond,
                                       inpaint, guidance_scale, uncond, loop, guidance_rescale)
        else:
            with torch.no_grad():
                noise_pred = predict_noise(transformer, model_in, t, cond, inpaint, guidance_scale, uncond, loop,
                                           guidance_rescale)
        step = scheduler.step(noise_pred, t, latents, return_dict=True, **step_kwargs)
        if step_callback is not None:
            step_callback(i + 1, total, denoised_estimate(scheduler, step, latents, noise_pred, t))
        latents = step.prev_sample
    return latents


def _step_takes(scheduler, argument: str) -> bool:
    import inspect

    return argument in inspect.signature(scheduler.step).parameters


def decode_latents(pipe: EasyAnimatePipe, latents: torch.Tensor, num_latents: int | None = None) -> torch.Tensor:
    """Latents -> video (B, 3, F, H, W) in [0, 1]. `num_latents` decodes only the first few
    (1 latent = the first frame; k latents = 1 + 4(k-1) frames): what reward training needs."""
    vae = pipe.vae
    if num_latents is not None:
        latents = latents[:, :, :num_latents]
    with pipe.placement.use(vae):
        video = vae_decode(vae, (latents / vae.config.scaling_factor).to(pipe.dtype), budget_bytes=vae_budget(pipe))
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
    # Sampler and speed options (easyanimate/schedulers.py, easyanimate/step_cache.py)
    shift: float = 0.0  # flow-matching models: 0 = the folder's own
    teacache: bool = False
    teacache_threshold: float = DEFAULT_TEACACHE_THRESHOLD
    cfg_skip_ratio: float = 0.0
    # Generation modes (easyanimate/conditioning.py says which model kind takes which input).
    end_image: torch.Tensor | None = None  # InP: the last frame
    video: torch.Tensor | None = None  # (F, 3, H, W) in [0, 1]: video-to-video with denoise_strength
    denoise_strength: float = 1.0  # 1: from pure noise (text-to-video); lower stays closer to `video`
    control_video: torch.Tensor | None = None  # (F, 3, H, W) in [0, 1]: Control models
    ref_image: torch.Tensor | None = None  # (3, H, W): V5.1 Control / Control-Camera reference
    camera: object | None = None  # camera.CameraPath: Control-Camera models
    guidance_rescale: float = 0.0  # diffusers' guidance_rescale (0 = off)
    base_resolution: int | None = None  # 512/768/960/1024: closest trained size for the input's aspect

    def speed(self) -> SpeedSettings:
        return SpeedSettings(self.teacache, self.teacache_threshold, self.cfg_skip_ratio).validate()


def sync_loras(model: EasyAnimateModel) -> None:
    """Make the shared transformer compute the LoRA stack this model carries (no-op if none ever)."""
    if not model.loras and model.pipe.lora_patcher is None:
        return
    from .lora_patch import get_patcher

    get_patcher(model.pipe).sync(model.pipe.transformer, model.loras)


def encode_request_prompts(pipe: EasyAnimatePipe, prompt: str, negative_prompt: str, guidance_scale: float
                           ) -> tuple[TextConditioning, TextConditioning | None]:
    """Prompt and (with CFG) negative prompt in one pass: the text encoders move in once."""
    check_guidance(guidance_scale)
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
    request = resolve_size(request)
    size = VideoSize.of(request).check()
    check_guidance(request.guidance_scale)
    speed = request.speed()
    check_steps(make_scheduler(pipe, request.scheduler, request.shift), request.steps)  # before any work
    conditioning.check_request(conditioning.model_inputs(pipe), request)
    check_sampling(pipe, request.width, request.height, request.frames, request.videos, request.guidance_scale,
                   request.start_image is not None)  # refuse before allocating (easyanimate/preflight.py)
    device = pipe.compute_device
    seeds = [request.seed + i for i in range(request.videos)]
    cond, uncond = text or encode_request_prompts(pipe, request.prompt, request.negative_prompt,
                                                  request.guidance_scale)
    shape = size.latent_shape(1, pipe.vae)
    with pipe.placement.use(pipe.vae if conditioning.needs_vae(request) else None):
        inpaints = conditioning.build_conditions(pipe, request, shape, seeds)
        source = conditioning.source_latents(pipe, request, shape)  # video-to-video
    sync_loras(model)
    latents_per_video = []
    with pipe.placement.use(pipe.transformer):
        for v, (seed, inpaint) in enumerate(zip(seeds, inpaints)):
            scheduler = make_scheduler(pipe, request.scheduler, request.shift)
            timesteps = set_timesteps(scheduler, request.steps, device)
            latents, timesteps = conditioning.start_latents(scheduler, timesteps, request.steps,
                                                            initial_noise(shape, [seed], device, pipe.dtype), source,
                                                            request.denoise_strength)
            total = len(timesteps) * len(seeds)
            callback = None
            if step_callback is not None:
                done = v * len(timesteps)
                callback = lambda i, n, x, done=done, total=total: step_callback(done + i, total, x)  # noqa: E731
            latents_per_video.append(denoise(pipe.transformer, scheduler, timesteps, latents, cond, inpaint,
                                             request.guidance_scale, uncond, step_callback=callback,
                                             generator=seeded_generator(seed, 2), speed=speed,
                                             guidance_rescale=request.guidance_rescale))
    with pipe.placement.use(pipe.vae):
        videos = [decode_latents(pipe, latents)[0] for latents in latents_per_video]
    return torch.cat([video.permute(1, 2, 3, 0).float().cpu() for video in videos])  # (F, H, W, 3) each
