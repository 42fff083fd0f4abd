"""Pre-flight memory check: estimate a request's peak per phase and refuse it before allocating.

The estimate is closed-form: per phase, the weights that must come onto the compute device in
the pipe's memory mode (measured from the loaded modules) plus the phase's activations from a
formula in the architecture's sizes, whose coefficients were calibrated with
benchmarks/memory_table.py (the real models under fake tensors). It runs in microseconds.

The budget is the compute device's free memory: on CUDA `torch.cuda.mem_get_info` plus what the
caching allocator holds unused; on the CPU the available RAM. The environment variable
EASYANIMATE_MEMORY_BUDGET_GB caps it (keep headroom for other programs, or test a refusal).
A request over budget raises MemoryPreflightError naming the phase, the estimate, the budget and
a memory mode or a video size that would fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

GIB = 2**30
BUDGET_ENV = "EASYANIMATE_MEMORY_BUDGET_GB"
TEXT_TOKENS = 256
SAFETY = 1.10  # estimates are raised by 10% before comparing with the budget

# ---- coefficients calibrated by benchmarks/memory_table.py (bf16, 2026-12-01) --------------------
# Denoise step: activations = tokens x width x batch x DENOISE_BYTES + DENOISE_FIXED_PER_WIDTH x width
# (tokens = latent frames x H/16 x W/16 + 256 text tokens; fused attention: linear in tokens).
DENOISE_BYTES = 24.2  # per token, channel and batch item, bf16
DENOISE_FIXED_PER_WIDTH = 0.0  # the fit's intercept is ~0
# VAE decode (Magvit, temporal chunks): activations = H x W x C0 x DECODE_PER_PIXEL_CHANNEL (the
# chunk's working set, C0 = the first block's channels; a spatial tile's area instead of H x W when
# tiling is on) + frames x H x W x DECODE_OUTPUT_PER_VOXEL (the decoded video, bf16 then float32).
DECODE_PER_PIXEL_CHANNEL = 153.0
DECODE_OUTPUT_PER_VOXEL = 7.0
# On the CPU the frames handed back (float32, permuted copy + concatenation) sit in the same RAM.
RESULT_PER_VOXEL = 24.0
# VAE encode (image-to-video): the masked video (float32 video, mask, noise) + the encoder's chunk.
ENCODE_PER_VOXEL = 34.0
ENCODE_PER_PIXEL_CHANNEL = 88.0
# Text encoders: activations per token and hidden unit (256 tokens, 2 prompts with CFG).
TEXT_BYTES = 700.0
# Training step with gradient checkpointing: per grad step, the saved block inputs of every layer;
# without checkpointing every activation of every layer of the grad steps.
TRAIN_CKPT_BYTES = 2.1  # per token, channel, layer and batch item, per grad step (simulated 12b tail 10)
TRAIN_FULL_BYTES = 140.0
TRAIN_FIXED = 2.0 * GIB  # one step's recompute, the first latent's decode with a graph, the reward's backward


class MemoryPreflightError(RuntimeError):
    """The request would not fit in the device's free memory; nothing was allocated."""


@dataclass
class PhaseEstimate:
    name: str
    weights: int  # bytes of weights that must come onto the compute device
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.activations


def _element_size(module) -> int:
    for p in module.parameters():
        return p.element_size() if p.is_floating_point() and p.element_size() >= 2 else 2
    return 2


def _bytes_to_bring(module, device: torch.device, mode: str) -> int:
    """Weights of `module` that are not on `device` now and must be there for its forward."""
    if module is None:
        return 0
    if mode == "sequential_cpu_offload":  # one leaf at a time
        best = 0
        for sub in module.modules():
            own = sum(p.numel() * p.element_size() for p in sub.parameters(recurse=False))
            best = max(best, own)
        return best
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device != device:
            total += t.numel() * t.element_size()
    return total


def _latents(width: int, height: int, frames: int) -> tuple[int, int, int]:
    from .sampling import latent_shape  # (sampling imports this module)

    return latent_shape(1, width, height, frames)[2:]


def _text_estimate(pipe) -> int:
    total = 0
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        if encoder is None:
            continue
        config = getattr(encoder, "config", None)
        hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
        if hidden is None and hasattr(config, "text_config"):
            hidden = getattr(config.text_config, "hidden_size", 1024)
        total = max(total, int(TEXT_BYTES * 2 * TEXT_TOKENS * int(hidden or 1024) * _element_size(encoder) / 2))
    return total


def denoise_activations(transformer, width: int, height: int, frames: int, batch: int) -> int:
    config = transformer.config
    channels = int(config.num_attention_heads) * int(config.attention_head_dim)
    patch = int(getattr(config, "patch_size", 2) or 2)
    lat_f, lat_h, lat_w = _latents(width, height, frames)
    tokens = lat_f * (lat_h // patch) * (lat_w // patch) + TEXT_TOKENS
    size = _element_size(transformer) / 2
    return int((DENOISE_BYTES * tokens * channels * batch + DENOISE_FIXED_PER_WIDTH * channels) * size)


def _vae_channels(vae) -> int:
    channels = getattr(vae.config, "block_out_channels", None) or [128]
    return int(channels[0])


def _tile_area(vae, width: int, height: int) -> int:
    if getattr(vae, "use_tiling", False):
        tile_h = int(getattr(vae, "tile_sample_min_height", height))
        tile_w = int(getattr(vae, "tile_sample_min_width", width))
        return min(height, tile_h) * min(width, tile_w)
    return height * width


def decode_activations(vae, width: int, height: int, frames: int, videos: int = 1) -> int:
    size = _element_size(vae) / 2
    chunk = DECODE_PER_PIXEL_CHANNEL * _tile_area(vae, width, height) * _vae_channels(vae) * size
    return int(chunk + DECODE_OUTPUT_PER_VOXEL * frames * height * width * videos)


def encode_activations(vae, width: int, height: int, frames: int) -> int:
    size = _element_size(vae) / 2
    chunk = ENCODE_PER_PIXEL_CHANNEL * _tile_area(vae, width, height) * _vae_channels(vae) * size
    return int(chunk + ENCODE_PER_VOXEL * frames * height * width)


def estimate_sampling(pipe, width: int, height: int, frames: int, videos: int = 1, guidance_scale: float = 6.0,
                      image_to_video: bool = False) -> list[PhaseEstimate]:
    device, mode = pipe.compute_device, pipe.placement.mode
    batch = 2 if guidance_scale > 1 else 1
    phases = [PhaseEstimate("text encode", sum(_bytes_to_bring(m, device, mode)
                                              for m in (pipe.text_encoder, pipe.text_encoder_2)), _text_estimate(pipe))]
    if image_to_video:
        phases.append(PhaseEstimate("VAE encode (start image)", _bytes_to_bring(pipe.vae, device, mode),
                                    encode_activations(pipe.vae, width, height, frames)))
    phases.append(PhaseEstimate("denoise step (CFG)" if batch == 2 else "denoise step",
                                _bytes_to_bring(pipe.transformer, device, mode),
                                denoise_activations(pipe.transformer, width, height, frames, batch)))
    result = int(RESULT_PER_VOXEL * 3 * frames * height * width * videos) if device.type == "cpu" else 0
    phases.append(PhaseEstimate("VAE decode", _bytes_to_bring(pipe.vae, device, mode),
                                decode_activations(pipe.vae, width, height, frames, videos) + result))
    return phases


def lora_parameter_count(transformer, rank: int) -> int:
    return sum(rank * (m.in_features + m.out_features) for m in transformer.modules()
               if isinstance(m, torch.nn.Linear))


def estimate_training(pipe, config, reward=None) -> list[PhaseEstimate]:
    device, mode = pipe.compute_device, pipe.placement.mode
    t = pipe.transformer
    weights = _bytes_to_bring(t, device, mode) + _bytes_to_bring(pipe.vae, device, mode)
    if reward is not None and isinstance(reward, torch.nn.Module):
        weights += _bytes_to_bring(reward, device, mode)
    params = lora_parameter_count(t, int(config.rank))
    per_param = 4 + 4 + (2.03 if getattr(config, "optimizer", "adamw") == "adamw_8bit" else 8)  # weight, grad, moments
    channels = int(t.config.num_attention_heads) * int(t.config.attention_head_dim)
    layers = int(getattr(t.config, "num_layers", 1))
    patch = int(getattr(t.config, "patch_size", 2) or 2)
    lat_f, lat_h, lat_w = _latents(config.width, config.height, config.frames)
    tokens = lat_f * (lat_h // patch) * (lat_w // patch) + TEXT_TOKENS
    batch = (2 if config.cfg > 1 else 1) * int(config.batch_size)
    from ..training.config import select_grad_steps
    from .sampling import is_flow_matching

    strategy = config.backprop
    if strategy == "auto":
        strategy = "tail" if is_flow_matching(pipe) else "last"
    try:
        steps = len(select_grad_steps(strategy, int(config.sampling_steps), int(config.backprop_k),
                                      int(config.backprop_start), int(config.backprop_end), config.backprop_steps))
    except ValueError:
        steps = 1
    per_step = (TRAIN_CKPT_BYTES if config.gradient_checkpointing else TRAIN_FULL_BYTES) * tokens * channels * layers * batch
    size = _element_size(t) / 2
    saved = per_step * steps * size
    if getattr(config, "activation_offload", False) and device.type != "cpu":
        saved = per_step * size  # one step's tensors come back at a time during backward
    scale = channels / 3072
    activations = int(saved + TRAIN_FIXED * scale * batch / 2 + denoise_activations(t, config.width, config.height,
                                                                                     config.frames, batch))
    resident = weights + int(params * per_param)
    phases = [PhaseEstimate("training step (rollout + backward + optimizer)", resident, activations)]
    if getattr(config, "validation_every", 0) > 0:  # whole videos at their own size, beside the training state
        w, h, f = config.validation_width, config.validation_height, config.validation_frames
        sampling = estimate_sampling(pipe, w, h, f, 1, config.validation_cfg)
        need = max(p.activations for p in sampling if p.name != "text encode")
        phases.append(PhaseEstimate(f"validation video {w}x{h}x{f}", resident, need))
    return phases


def free_bytes(device: torch.device | str) -> int:
    """What the device can still give: CUDA free + cached-but-unused, or available RAM; capped by
    EASYANIMATE_MEMORY_BUDGET_GB when set."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        free = _available_ram()
    cap = os.environ.get(BUDGET_ENV, "").strip()
    if cap:
        try:
            free = min(free, int(float(cap) * 1e9))
        except ValueError:
            raise ValueError(f"{BUDGET_ENV}={cap!r} is not a number of GB") from None
    return int(free)


def _available_ram() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil comes with ComfyUI; plain Python may lack it
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return 1 << 62  # unknown: do not refuse


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _smaller_sizes(width: int, height: int, frames: int):
    for frames_try in sorted({frames, 49, 25, 9, 1}, reverse=True):
        if frames_try > frames:
            continue
        for scale in (1.0, 0.75, 0.5, 0.375, 0.25):
            w, h = max(16, int(width * scale) // 16 * 16), max(16, int(height * scale) // 16 * 16)
            if (w, h, frames_try) != (width, height, frames):
                yield w, h, frames_try


def check_sampling(pipe, width: int, height: int, frames: int, videos: int = 1, guidance_scale: float = 6.0,
                   image_to_video: bool = False, budget: int | None = None) -> list[PhaseEstimate]:
    """Raise MemoryPreflightError when the request's worst phase exceeds the free memory."""
    phases = estimate_sampling(pipe, width, height, frames, videos, guidance_scale, image_to_video)
    budget = free_bytes(pipe.compute_device) if budget is None else budget
    worst = max(phases, key=lambda p: p.total)
    if worst.total * SAFETY <= budget:
        return phases
    kind = "image-to-video" if image_to_video else "text-to-video"
    fits = []
    for w, h, f in _smaller_sizes(width, height, frames):
        need = max(p.total for p in estimate_sampling(pipe, w, h, f, videos, guidance_scale, image_to_video))
        if need * SAFETY <= budget:
            fits.append(f"{w}x{h}x{f} frames ({_gib(need)})")
            break
    mode = pipe.placement.mode
    hint = _mode_hint(pipe, worst, budget)
    raise MemoryPreflightError(
        f"not enough memory for {width}x{height}x{frames} {kind} ({videos} video(s)) in gpu_memory_mode {mode!r}: "
        f"the {worst.name} needs about {_gib(worst.total)} (weights to load {_gib(worst.weights)} + activations "
        f"{_gib(worst.activations)}), but only {_gib(budget)} is free on {pipe.compute_device}"
        + (f" (capped by {BUDGET_ENV})" if os.environ.get(BUDGET_ENV) else "") + ". Nothing was allocated. "
        + ("Would fit: " + "; ".join(([hint] if hint else []) + fits) + "." if (hint or fits) else
           "No smaller size fits either: free memory, or use a smaller model.")
        + " Estimates from benchmarks/memory_table.py's calibration, +10% headroom.")


def _mode_hint(pipe, worst: PhaseEstimate, budget: int) -> str:
    """A slower memory mode that would bring the phase under budget (CUDA only: on the CPU every
    weight is already in RAM, so the mode changes nothing)."""
    if pipe.compute_device.type == "cpu":
        return ""
    mode = pipe.placement.mode
    if worst.activations * SAFETY > budget:
        return ""
    if mode == "none" and worst.total * SAFETY > budget:
        return "gpu_memory_mode 'model_cpu_offload' (only the phase's module on the GPU)"
    if mode in ("none", "model_cpu_offload"):
        return "gpu_memory_mode 'model_cpu_offload_and_qfloat8' or 'sequential_cpu_offload'"
    if mode == "model_cpu_offload_and_qfloat8":
        return "gpu_memory_mode 'sequential_cpu_offload'"
    return ""


def check_training(pipe, config, reward=None, budget: int | None = None) -> list[PhaseEstimate]:
    phases = estimate_training(pipe, config, reward)
    budget = free_bytes(pipe.compute_device) if budget is None else budget
    worst = max(phases, key=lambda p: p.total)
    if worst.total * SAFETY <= budget:
        return phases
    if worst.name.startswith("validation"):
        raise MemoryPreflightError(
            f"not enough memory for the {worst.name} beside the training state: it needs about {_gib(worst.total)} "
            f"but only {_gib(budget)} is free on {pipe.compute_device}. Nothing was allocated. Try a smaller "
            "validation size or fewer validation frames, or validation_every 0.")
    hints = []
    if not config.gradient_checkpointing:
        hints.append("gradient_checkpointing on")
    if not getattr(config, "activation_offload", False) and pipe.compute_device.type != "cpu":
        hints.append("activation_offload on")
    if getattr(config, "optimizer", "adamw") != "adamw_8bit":
        hints.append("optimizer 'adamw_8bit'")
    hints.append("fewer backprop steps (backprop 'last') or a smaller rollout size")
    raise MemoryPreflightError(
        f"not enough memory to train at {config.width}x{config.height}x{config.frames} (batch {config.batch_size}, "
        f"LoRA rank {config.rank}) in gpu_memory_mode {pipe.placement.mode!r}: one step needs about "
        f"{_gib(worst.total)} (weights, LoRA and optimizer state {_gib(worst.weights)} + activations "
        f"{_gib(worst.activations)}), but only {_gib(budget)} is free on {pipe.compute_device}"
        + (f" (capped by {BUDGET_ENV})" if os.environ.get(BUDGET_ENV) else "")
        + ". Nothing was allocated. Try: " + ", ".join(hints) + ".")
