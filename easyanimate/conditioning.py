"""What a model takes besides the noisy latents, and how each generation mode builds it.

The model kind is read from the transformer's own config (its input channels), never from the
folder name. diffusers' config has no control flags; `EasyAnimateTransformer3DModel.forward`
concatenates `[latents, inpaint_latents, control_latents]` on the channel axis before its patch
embedding, so `in_channels` says which extra inputs the weights expect (L = 16 latent channels):

| in_channels | kind | extra inputs | models | source |
|---|---|---|---|---|
| 16 = L | text-to-video | none | EasyAnimateV5-{7b,12b}-zh, V5.1-{7b,12b}-zh | official comfyui_nodes.py: `in_channels == latent_channels` -> EasyAnimatePipeline, no inpaint |
| 33 = 2L + 1 | InP | inpaint: 1 mask + L masked-video latents | ...-zh-InP | pipeline_easyanimate_inpaint.py (mask + masked video) |
| 32 = 2L | Control | control: L control-video latents | EasyAnimateV5-12b-zh-Control | official train_control.py `train_mode="control"`; V5 yaml has no `add_ref_latent_in_control_model` |
| 48 = 3L | Control + reference | control: L control-video latents + L reference latents (frame 0) | V5.1-{7b,12b}-zh-Control | V5.1 yaml `add_ref_latent_in_control_model: true`; diffusers' EasyAnimateControlPipeline always appends the reference slot |
| 38 = 2L + 6 | Control-Camera + reference | control: 6 Plücker channels + L reference latents | V5.1-{7b,12b}-zh-Control-Camera | train_control.py `train_mode="control_camera_ref"` |
| 22 = L + 6 | Control-Camera | control: 6 Plücker channels | (no published model; accepted) | same layout without the reference slot |

Facts used for the conditioning (official pipelines, diffusers' EasyAnimateControlPipeline):
- Control video frames are resized to the video size, mapped to [-1, 1] and VAE-encoded
  (`.mode() * scaling_factor`); a missing control video is zeros.
- The reference image is VAE-encoded and placed in latent frame 0 of an otherwise zero tensor;
  with a single latent frame the slot stays zero (both the official pipeline and diffusers do so).
- InP start / end images: the official `get_image_to_video_latent` keeps frame 0 (start) and the last
  frame (end), every other frame is -1 (masked); the mask channel is the kept mask resized to the
  latent grid (first frame apart) times the VAE scaling factor. End image alone is this pack's
  extension (frame 0 masked, last kept).
- Video-to-video (official `strength` / `denoise_strength`): the input frames are encoded, the
  schedule starts at step `steps - int(steps * strength)`, the latents are the scheduler's
  `add_noise(video, noise, t0)` (`scale_noise` for flow matching); strength 1 is pure noise, i.e.
  text-to-video.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .camera import CAMERA_CHANNELS, CAMERA_SCALE, CameraPath
from .vae import vae_budget, vae_encode_mode

LATENT_CHANNELS = 16
INPAINT_NOISE_RATIO = 0.0563  # diffusers' EasyAnimate default noise augmentation of kept frames

T2V, INPAINT, CONTROL, CAMERA = "text-to-video", "InP", "Control", "Control-Camera"

# The optional inputs of a request, by the name the node shows.
IMAGE_INPUTS = ("start_image", "end_image", "video", "control_video", "ref_image", "camera")


@dataclass(frozen=True)
class ModelInputs:
    """Which extra inputs a transformer takes, decided by its input channels."""

    kind: str
    in_channels: int
    reference: bool = False  # a reference-image slot after the control channels

    @property
    def accepts(self) -> tuple[str, ...]:
        if self.kind == T2V:
            return ("video",)
        if self.kind == INPAINT:
            return ("start_image", "end_image", "video")
        if self.kind == CONTROL:
            return ("control_video", "video") + (("ref_image",) if self.reference else ())
        return ("camera", "video") + (("ref_image",) if self.reference else ())

    @property
    def control_channels(self) -> int:
        own = {CONTROL: LATENT_CHANNELS, CAMERA: CAMERA_CHANNELS}.get(self.kind, 0)
        return own + (LATENT_CHANNELS if self.reference else 0)

    def describe(self) -> str:
        ref = " with a reference-image slot" if self.reference else ""
        return f"{self.kind} model{ref} (transformer in_channels {self.in_channels})"


_LAYOUTS = {
    LATENT_CHANNELS: (T2V, False),
    2 * LATENT_CHANNELS + 1: (INPAINT, False),
    2 * LATENT_CHANNELS: (CONTROL, False),
    3 * LATENT_CHANNELS: (CONTROL, True),
    LATENT_CHANNELS + CAMERA_CHANNELS: (CAMERA, False),
    2 * LATENT_CHANNELS + CAMERA_CHANNELS: (CAMERA, True),
}
# in_channels of each kind as published (the tiny test folders use the same).
PUBLISHED_IN_CHANNELS = {("v5", "t2v"): 16, ("v5.1", "t2v"): 16, ("v5", "inpaint"): 33, ("v5.1", "inpaint"): 33,
                         ("v5", "control"): 32, ("v5.1", "control"): 48, ("v5.1", "camera"): 38}


def model_inputs_from_config(config) -> ModelInputs:
    """`config`: the transformer config (diffusers object or dict)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    in_channels = int(get("in_channels"))
    out_channels = int(get("out_channels") or LATENT_CHANNELS)
    if out_channels not in (LATENT_CHANNELS, 2 * LATENT_CHANNELS):
        raise ValueError(f"transformer out_channels {out_channels}: EasyAnimate models predict {LATENT_CHANNELS} "
                         "latent channels")
    if in_channels not in _LAYOUTS:
        known = ", ".join(f"{n} ({kind}{' + reference' if ref else ''})" for n, (kind, ref) in sorted(_LAYOUTS.items()))
        raise ValueError(f"transformer in_channels {in_channels} matches no EasyAnimate model kind; known: {known}")
    kind, reference = _LAYOUTS[in_channels]
    return ModelInputs(kind, in_channels, reference)


def model_inputs(pipe) -> ModelInputs:
    return model_inputs_from_config(pipe.transformer.config)


# ------------------------------------------------------------------------------ checks

_HINTS = {
    "start_image": "image-to-video needs an InP model (EasyAnimateV5-12b-zh-InP, V5.1-12b-zh-InP); to refine "
                   "existing frames connect them as `video` with a denoise strength",
    "end_image": "start/end frames need an InP model (EasyAnimateV5-12b-zh-InP, V5.1-12b-zh-InP)",
    "control_video": "a control video needs a Control model (EasyAnimateV5-12b-zh-Control, V5.1-12b-zh-Control)",
    "ref_image": "a reference image needs a V5.1 Control or Control-Camera model; for an InP model use start_image",
    "camera": "camera motion needs a V5.1 Control-Camera model (EasyAnimateV5.1-12b-zh-Control-Camera)",
}


def given_inputs(request) -> list[str]:
    return [name for name in IMAGE_INPUTS if getattr(request, name, None) is not None]


def _frame_count(frames: torch.Tensor) -> int:
    return frames.shape[0]


def check_request(inputs: ModelInputs, request) -> None:
    """Refuse, before any work, inputs this model cannot take and inputs of the wrong size."""
    for name in given_inputs(request):
        if name not in inputs.accepts:
            raise ValueError(f"{name} cannot be used with this {inputs.describe()}: it takes "
                             f"{', '.join(inputs.accepts)}. {_HINTS.get(name, '')}".rstrip(". ") + ".")
    if inputs.kind == CAMERA and request.camera is None:
        raise ValueError(f"this {inputs.describe()} needs a camera input (EasyAnimate Camera Motion node; "
                         "'static' for a still camera)")
    strength = float(request.denoise_strength)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"denoise_strength must be in (0, 1], got {strength}")
    if request.video is not None:
        if strength < 1.0 and int(request.steps * strength) < 1:
            raise ValueError(f"denoise_strength {strength} with {request.steps} steps leaves no denoising step "
                             f"(int(steps * strength) = 0); raise steps or the strength")
    for name in ("video", "control_video"):
        frames = getattr(request, name)
        if frames is None:
            continue
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"{name} must be frames (F, 3, H, W), got {tuple(frames.shape)}")
        if _frame_count(frames) < request.frames:
            raise ValueError(f"{name} has {_frame_count(frames)} frames but the video has {request.frames}; "
                             f"give at least {request.frames} frames or lower `frames`")
    if request.camera is not None:
        if not isinstance(request.camera, CameraPath):
            raise ValueError(f"camera must be a CameraPath, got {type(request.camera).__name__}")
        if request.camera.frames < request.frames:
            raise ValueError(f"the camera motion has {request.camera.frames} frames but the video has "
                             f"{request.frames}; set the camera node's frames to at least {request.frames}")


# ------------------------------------------------------------------------------ the extra inputs


@dataclass
class Condition:
    """The transformer's extra inputs for one video (batch 1) or a batch; None where not taken."""

    inpaint: torch.Tensor | None = None
    control: torch.Tensor | None = None


def transformer_kwargs(condition, copies: int = 1) -> dict:
    """Keyword arguments for the transformer; `condition` is a Condition, a bare inpaint tensor, or
    None. `copies` repeats it along the batch (2 for classifier-free guidance)."""
    if condition is None:
        return {}
    if isinstance(condition, torch.Tensor):
        condition = Condition(inpaint=condition)
    out = {}
    for key, value in (("inpaint_latents", condition.inpaint), ("control_latents", condition.control)):
        if value is not None:
            out[key] = torch.cat([value] * copies) if copies > 1 else value
    return out


def empty_condition(pipe, shape) -> Condition | torch.Tensor | None:
    """Zeros for every extra input the model takes: text-to-video on any kind (training rollouts)."""
    inputs = model_inputs(pipe)
    batch, _, lat_f, lat_h, lat_w = shape
    zeros = lambda c: torch.zeros((batch, c, lat_f, lat_h, lat_w), device=pipe.compute_device,  # noqa: E731
                                  dtype=pipe.dtype)
    if inputs.kind == INPAINT:
        return zeros(1 + LATENT_CHANNELS)  # a bare tensor, as callers of inpaint_condition always got
    if inputs.kind in (CONTROL, CAMERA):
        return Condition(control=zeros(inputs.control_channels))
    return None


def resize_like_latents(values: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """Trilinear resize of (B, C, F, H, W) to a latent grid, frame 0 on its own: the Magvit VAE
    encodes the first frame apart, so masks and camera maps are resized the same way. This is
    diffusers' EasyAnimate `resize_mask`; only the latents' shape is needed, not their values."""
    from diffusers.pipelines.easyanimate.pipeline_easyanimate_inpaint import resize_mask

    return resize_mask(values, torch.empty(latent_shape, device="meta"))


def _frames_to_video(frames: torch.Tensor, count: int, height: int, width: int, device) -> torch.Tensor:
    """(N, 3, h, w) in [0, 1] -> (1, 3, count, H, W) in [-1, 1], first `count` frames, resized."""
    video = frames[:count].to(device, torch.float32)
    if video.shape[-2:] != (height, width):
        video = F.interpolate(video, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return (video.clamp(0, 1) * 2 - 1).permute(1, 0, 2, 3)[None]


def _image(image: torch.Tensor | None) -> torch.Tensor | None:
    return image[None] if image is not None and image.ndim == 3 else image


def vae_encode(pipe, video: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> scaled latents (B, 16, F', H/8, W/8) in the pipe's dtype."""
    vae = pipe.vae
    with pipe.placement.use(vae):  # chunked, tiled when the budget needs it, Cancel between chunks
        latents = vae_encode_mode(vae, video.to(vae.dtype), budget_bytes=vae_budget(pipe)) * vae.config.scaling_factor
    return latents.to(pipe.dtype)


def seeded_generator(seed: int, offset: int = 0) -> torch.Generator:
    """A CPU generator for `seed` (+ offset for the other random draws of the same video); wraps
    around at 2**64 like ComfyUI's seed widget, so its largest seeds work too."""
    return torch.Generator("cpu").manual_seed((int(seed) + offset) % 2**64)


def seeded_noise(shape, seeds: list[int], device, dtype: torch.dtype = torch.float32, offset: int = 0) -> torch.Tensor:
    """Standard normal noise (len(seeds), *shape[1:]), row i from its own CPU generator
    (`seeded_generator(seeds[i], offset)`): a seed draws the same noise on any device and in any
    batch. Drawn in float32 by diffusers' `randn_tensor`, then cast to `dtype`."""
    from diffusers.utils.torch_utils import randn_tensor

    generators = [seeded_generator(s, offset) for s in seeds]
    noise = randn_tensor((len(seeds), *shape[1:]), generator=generators, device=torch.device(device),
                         dtype=torch.float32)
    return noise.to(dtype)


@torch.no_grad()
def inpaint_latents(pipe, shape, frames: int, start_images: torch.Tensor | None, seeds: list[int],
                    end_images: torch.Tensor | None = None) -> torch.Tensor:
    """The 17 InP channels: the kept-frame mask + the latents of the masked video (kept frames:
    0 for the start image, the last for the end image; every other frame -1)."""
    device, dtype = pipe.compute_device, pipe.dtype
    batch, _, lat_f, lat_h, lat_w = shape
    height, width = lat_h * pipe.vae.spatial_compression_ratio, lat_w * pipe.vae.spatial_compression_ratio
    video = torch.full((batch, 3, frames, height, width), -1.0, device=device)
    keep = torch.zeros((batch, 1, frames, height, width), device=device)
    for index, image in ((0, start_images), (frames - 1, end_images)):
        if image is None:
            continue
        video[:, :, index] = _frames_to_video(_image(image), 1, height, width, device)[:, :, 0].expand(batch, -1, -1, -1)
        keep[:, :, index] = 1.0
    if getattr(pipe.transformer.config, "add_noise_in_inpaint_model", False):
        noise = seeded_noise(video.shape, seeds, device, offset=1)
        video = torch.where(video == -1, video, video + INPAINT_NOISE_RATIO * noise)
    masked = vae_encode(pipe, video)
    mask = resize_like_latents(keep, masked.shape) * pipe.vae.config.scaling_factor
    return torch.cat([mask.to(dtype), masked], dim=1)


@torch.no_grad()
def control_latents(pipe, inputs: ModelInputs, request, shape) -> torch.Tensor:
    """Control (or camera) channels, then the reference slot where the model has one."""
    device, dtype = pipe.compute_device, pipe.dtype
    _, _, lat_f, lat_h, lat_w = shape
    height, width = lat_h * pipe.vae.spatial_compression_ratio, lat_w * pipe.vae.spatial_compression_ratio
    parts = []
    if inputs.kind == CAMERA:
        rays = request.camera.plucker(width, height, request.frames)[None].to(device)
        parts.append((resize_like_latents(rays, shape) * CAMERA_SCALE).to(dtype))
    elif request.control_video is not None:
        parts.append(vae_encode(pipe, _frames_to_video(request.control_video, request.frames, height, width, device)))
    else:
        parts.append(torch.zeros((1, LATENT_CHANNELS, lat_f, lat_h, lat_w), device=device, dtype=dtype))
    if inputs.reference:
        ref = torch.zeros((1, LATENT_CHANNELS, lat_f, lat_h, lat_w), device=device, dtype=dtype)
        if request.ref_image is not None and lat_f > 1:
            ref[:, :, :1] = vae_encode(pipe, _frames_to_video(_image(request.ref_image), 1, height, width, device))
        parts.append(ref)
    return torch.cat(parts, dim=1)


def needs_vae(request) -> bool:
    return any(getattr(request, name, None) is not None for name in IMAGE_INPUTS if name != "camera")


@torch.no_grad()
def build_conditions(pipe, request, shape, seeds: list[int]) -> list[Condition | torch.Tensor | None]:
    """The extra transformer inputs for each video of a request (seeds differ only in the InP
    noise augmentation; control inputs are built once)."""
    inputs = model_inputs(pipe)
    if inputs.kind == INPAINT:
        start, end = _image(request.start_image), _image(request.end_image)
        if start is None and end is None:
            return [empty_condition(pipe, shape) for _ in seeds]
        return [inpaint_latents(pipe, shape, request.frames, start, [s], end) for s in seeds]
    if inputs.kind in (CONTROL, CAMERA):
        control = control_latents(pipe, inputs, request, shape)
        return [Condition(control=control) for _ in seeds]
    return [None for _ in seeds]


# ------------------------------------------------------------------------------ video-to-video


@torch.no_grad()
def source_latents(pipe, request, shape) -> torch.Tensor | None:
    """The input video's latents for video-to-video (None for text/image-to-video or strength 1)."""
    if request.video is None or float(request.denoise_strength) >= 1.0:
        return None
    _, _, _, lat_h, lat_w = shape
    return vae_encode(pipe, _frames_to_video(request.video, request.frames, lat_h * pipe.vae.spatial_compression_ratio,
                                             lat_w * pipe.vae.spatial_compression_ratio,
                                             pipe.compute_device))


def start_latents(scheduler, timesteps: torch.Tensor, steps: int, noise: torch.Tensor, source: torch.Tensor | None,
                  strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(initial latents, the timesteps to run). Pure noise over the whole schedule without a source
    video (or at strength 1); else the source noised to the first kept timestep."""
    if source is None or strength >= 1.0:
        return noise * getattr(scheduler, "init_noise_sigma", 1.0), timesteps
    order = getattr(scheduler, "order", 1)
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise ValueError(f"denoise_strength {strength} with {steps} steps leaves no denoising step")
    begin = (steps - kept) * order
    timesteps = timesteps[begin:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    t0 = timesteps[:1]
    source = source.to(noise.device, noise.dtype)
    if hasattr(scheduler, "scale_noise"):  # flow matching: x_t = t * noise + (1 - t) * x_0
        return scheduler.scale_noise(source, t0, noise), timesteps
    return scheduler.add_noise(source, noise, t0), timesteps


# ------------------------------------------------------------------------------ guidance


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, sec. 3.4; diffusers' `guidance_rescale`): match the guided
    prediction's per-sample std to the conditional one's, mixed by `rescale`."""
    if rescale <= 0:
        return guided
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided
