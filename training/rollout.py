"""One training rollout: the pack's sampling loop from noise, with gradients kept only on chosen
steps, then a partial decode and the frames a reward scores.

Everything goes through easyanimate.sampling (make_scheduler, set_timesteps, initial_noise,
inpaint_condition, denoise, decode_latents), so training sees exactly the sampler users run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import torch
import torch.utils.checkpoint

from ..easyanimate.model import EasyAnimatePipe
from ..easyanimate.sampling import (
    StepCallback,
    decode_latents,
    denoise,
    initial_noise,
    inpaint_condition,
    latent_shape,
    make_scheduler,
    seeded_generator,
    set_timesteps,
)
from ..easyanimate.step_cache import DEFAULT_TEACACHE_THRESHOLD, SpeedSettings
from ..easyanimate.text import TextConditioning, encode_prompts
from ..reward.base import module_device
from ..reward.video import score_per_video
from .config import TrainConfig
from .embedding_store import DEFAULT_RAM_LIMIT, EmbeddingStore

GradSteps = Collection[int] | Callable[[int], Collection[int]]
ALL_FRAMES = 0  # num_sampled_frames 0: score every decoded frame


@dataclass(frozen=True)
class RolloutSettings:
    width: int = 256
    height: int = 256
    frames: int = 49
    sampling_steps: int = 50
    guidance_scale: float = 6.0
    scheduler: str = "auto"
    num_decoded_latents: int = 1
    num_sampled_frames: int = 1
    # Inference speed-ups and the flow shift: off / the folder's own unless turned on explicitly.
    shift: float = 0.0
    speed: SpeedSettings = SpeedSettings()
    eta: float = 0.0  # DDIM only

    @classmethod
    def from_config(cls, config: TrainConfig) -> "RolloutSettings":
        speed = SpeedSettings(getattr(config, "teacache", False),
                              getattr(config, "teacache_threshold", DEFAULT_TEACACHE_THRESHOLD),
                              getattr(config, "cfg_skip_ratio", 0.0))
        return cls(config.width, config.height, config.frames, config.sampling_steps, config.cfg,
                   config.scheduler, config.num_decoded_latents, config.num_sampled_frames,
                   getattr(config, "shift", 0.0), speed, getattr(config, "eta", 0.0))


@contextlib.contextmanager
def hold_on_device(pipe: EasyAnimatePipe):
    """Transformer and VAE on the compute device for the block (whole-module offload modes)."""
    if pipe.placement.mode == "sequential_cpu_offload":
        raise ValueError("reward training cannot run under gpu_memory_mode 'sequential_cpu_offload': its hooks move "
                         "each layer's weights back to the CPU right after the forward, but backprop needs them "
                         "again. Use 'model_cpu_offload' or 'model_cpu_offload_and_qfloat8'.")
    with pipe.placement.use(pipe.transformer), pipe.placement.use(pipe.vae):
        yield pipe  # placement.use is reentrant: inner blocks of the sampler leave them here


def make_autograd_safe(module) -> int:
    """Replace inference-mode tensors (ComfyUI loads and runs nodes under torch.inference_mode(),
    and autograd cannot save such tensors for backward) with normal copies, one at a time.
    Returns how many were replaced; a no-op for modules loaded outside inference mode."""
    replaced = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and param.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
                    replaced += 1
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None and buffer.is_inference():
                    sub._buffers[name] = buffer.clone()
                    replaced += 1
    return replaced


def _cached_feature_modules(module) -> list:
    return [m for m in module.modules() if hasattr(m, "prev_features")]


def cache_safe_checkpoint(module, *args):
    """Gradient checkpointing for the Magvit VAE, whose causal convolutions and upsamplers keep the
    previous chunk's features in `prev_features`. diffusers' plain checkpointing recomputes a block
    in backward with whatever cache is there by then (cleared, or another chunk's), so it can take
    another branch than the forward did, and it leaves recomputed tensors in the cache, which
    changes the NEXT decode. Here the recomputation sees the cache exactly as the forward saw it,
    and the cache is put back as it was afterwards."""
    cached = _cached_feature_modules(module)
    at_forward = [m.prev_features for m in cached]

    @contextlib.contextmanager
    def as_in_forward():
        current = [m.prev_features for m in cached]
        for m, state in zip(cached, at_forward):
            m.prev_features = state
        try:
            yield
        finally:
            for m, state in zip(cached, current):
                m.prev_features = state

    def context_fn():
        return contextlib.nullcontext(), as_in_forward()

    return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False, context_fn=context_fn)


def enable_gradient_checkpointing(pipe: EasyAnimatePipe) -> Callable[[], None]:
    """Checkpoint the transformer's blocks (diffusers' own) and the VAE's blocks (cache-safe).
    Returns a function that restores the previous settings."""
    undo = []
    transformer, vae = pipe.transformer, pipe.vae
    if getattr(transformer, "_supports_gradient_checkpointing", False) and not transformer.is_gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        undo.append(transformer.disable_gradient_checkpointing)
    if getattr(vae, "_supports_gradient_checkpointing", False) and not vae.is_gradient_checkpointing:
        vae.enable_gradient_checkpointing(gradient_checkpointing_func=cache_safe_checkpoint)
        undo.append(vae.disable_gradient_checkpointing)

    def restore() -> None:
        for fn in undo:
            fn()

    return restore


class PromptBank:
    """Text conditioning of every prompt, encoded once and kept on the CPU: the text encoders are
    on the GPU only during this encoding (the pipe's placement moves them), never during training."""

    def __init__(self, pipe: EasyAnimatePipe, prompts: Sequence[str], negative_prompt: str = "", chunk: int = 8,
                 ram_limit: int = DEFAULT_RAM_LIMIT):
        self.pipe = pipe
        self.negative_prompt = negative_prompt
        unique = list(dict.fromkeys(list(prompts) + [negative_prompt]))
        # More than ram_limit prompts: embeddings go to disk chunk by chunk (training/embedding_store.py).
        self.store = EmbeddingStore(len(unique), ram_limit)
        # The encoders move to the GPU once for all chunks, not once per chunk.
        with pipe.placement.use(pipe.text_encoder), pipe.placement.use(pipe.text_encoder_2):
            for start in range(0, len(unique), chunk):
                part = unique[start:start + chunk]
                self.store.add_chunk(part, encode_prompts(pipe, part))

    def cond(self, prompts: Sequence[str]) -> TextConditioning:
        parts = [self.store.get(p) for p in prompts]
        return TextConditioning.cat(parts).to(self.pipe.compute_device, self.pipe.dtype)

    def uncond(self, batch: int) -> TextConditioning:
        return self.cond([self.negative_prompt] * batch)


def rollout_video(pipe: EasyAnimatePipe, settings: RolloutSettings, cond: TextConditioning,
                  uncond: TextConditioning | None, seeds: Sequence[int], grad_steps: GradSteps = (),
                  detach_input: bool = False, step_callback: StepCallback | None = None,
                  start_images: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Sample from noise and decode the first `num_decoded_latents` latents.

    Returns video (B, 3, F', H, W) in [0, 1] with F' = 1 + 4 (k - 1). `grad_steps` is a set of step
    indices, or a function of the number of timesteps returning one. Steps outside it run under
    no_grad; run the whole call under torch.no_grad() for evaluation. `start_images`: one per video,
    (1, 3, h, w) in [0, 1] or None (image-to-video on InP models, text-to-video for None).
    """
    device = pipe.compute_device
    scheduler = make_scheduler(pipe, settings.scheduler, settings.shift)
    timesteps = set_timesteps(scheduler, settings.sampling_steps, device)
    chosen = grad_steps(len(timesteps)) if callable(grad_steps) else grad_steps
    shape = latent_shape(len(seeds), settings.width, settings.height, settings.frames)
    latents = initial_noise(shape, list(seeds), device, pipe.dtype) * getattr(scheduler, "init_noise_sigma", 1.0)
    inpaint = rollout_condition(pipe, shape, settings.frames, list(seeds), start_images)
    guidance = settings.guidance_scale if uncond is not None else 1.0
    latents = denoise(pipe.transformer, scheduler, timesteps, latents, cond, inpaint, guidance, uncond,
                      grad_steps=frozenset(chosen), detach_input=detach_input, step_callback=step_callback,
                      generator=[seeded_generator(s, 2) for s in seeds], speed=settings.speed,  # one per video
                      eta=settings.eta)
    return decode_latents(pipe, latents, settings.num_decoded_latents)


def rollout_condition(pipe: EasyAnimatePipe, shape, frames: int, seeds: list[int],
                      start_images: Sequence[torch.Tensor | None] | None):
    """The transformer's extra inputs: text-to-video for the whole batch, or video by video with
    each one's start image (a batch may mix both)."""
    if not start_images or all(image is None for image in start_images):
        return inpaint_condition(pipe, shape, frames, None, seeds)
    one = (1, *shape[1:])
    parts = [inpaint_condition(pipe, one, frames, image, [seed]) for image, seed in zip(start_images, seeds)]
    return torch.cat(parts)


def sampled_frame_indices(available: int, count: int) -> list[int]:
    """Which of `available` decoded frames are scored, as the official trainer picks them:
    `torch.linspace(0, available - 1, count).long()` (spread evenly, rounded down; first and last
    included). count 0 (ALL_FRAMES) = every decoded frame."""
    if count < 0:
        raise ValueError(f"num_sampled_frames must be >= 0 (0 = all decoded frames), got {count}")
    if count == ALL_FRAMES:
        return list(range(available))
    if count > available:
        raise ValueError(f"num_sampled_frames {count} exceeds the {available} decoded frames")
    # Real numbers even while a memory simulation runs under FakeTensorMode (no data there).
    with _real_tensors():
        return torch.linspace(0, available - 1, count).long().tolist()


def _real_tensors():
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
    except ImportError:  # older torch: no fake mode to step out of
        return contextlib.nullcontext()
    return unset_fake_temporarily()


def pick_frames(video: torch.Tensor, count: int) -> torch.Tensor:
    """(B, 3, F, H, W) -> (B * count, 3, H, W), video by video (frames of one video adjacent)."""
    indices = sampled_frame_indices(video.shape[2], count)
    frames = video[:, :, indices]  # (B, 3, n, H, W)
    return frames.permute(0, 2, 1, 3, 4).reshape(-1, *video.shape[1:2], *video.shape[3:])


def frame_rewards(reward, video: torch.Tensor, prompts: Sequence[str], count: int) -> torch.Tensor:
    """Reward of each sampled frame of each video -> (B, n) float32, differentiable."""
    frames = pick_frames(video, count)
    per_video = frames.shape[0] // video.shape[0]
    frame_prompts = [p for p in prompts for _ in range(per_video)]
    device = module_device(reward)
    if device is not None and frames.device != device:
        frames = frames.to(device)
    # A time-aware term (motion, temporal consistency) only ever sees one video's frames.
    scores = score_per_video(reward, frames, frame_prompts, per_video).float()
    return scores.view(video.shape[0], per_video)


def video_rewards(reward, video: torch.Tensor, prompts: Sequence[str], count: int) -> torch.Tensor:
    """Mean reward of each video's sampled frames -> (B,) float32, differentiable."""
    return frame_rewards(reward, video, prompts, count).mean(dim=1)


def reward_loss(rewards: torch.Tensor, max_reward: float | None = None, scale: float = 1.0) -> torch.Tensor:
    """The official loss on per-frame rewards (B, n) (or per-video ones (B,)): -mean(reward) * scale,
    or with a target the mean over every frame of |reward - max_reward| * scale (a frame above the
    target costs as much as one below; |mean - max| would let frames above it cancel ones below)."""
    if max_reward is None:
        return -rewards.mean() * scale
    return (rewards - max_reward).abs().mean() * scale
