"""Latent previews while sampling: a cheap latent-to-RGB projection, fitted once per model folder
from that model's own VAE, and the denoised estimate the preview shows.

The projection is an affine map of the 16 latent channels to RGB (a 3 x 16 matrix and a bias),
fitted by least squares: a few smooth synthetic colour images are encoded with the model's VAE,
their latents decoded again, and each latent pixel is paired with the mean colour of the 8 x 8
pixels it decodes to. It is fitted once per VAE weights file (path, size, mtime) and kept for the
process, so reloading a folder does not fit again.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FIT_IMAGES = 12
FIT_SIZE = 64  # pixels; 8 x 8 latent pixels each, one latent frame


@dataclass(frozen=True)
class LatentRGB:
    weight: torch.Tensor  # (3, C) float32
    bias: torch.Tensor  # (3,) float32

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """(C, h, w) scaled latents -> (h, w, 3) RGB in [0, 1], float32, CPU."""
        x = latents.detach().float().cpu()
        rgb = torch.einsum("chw,rc->hwr", x, self.weight) + self.bias
        return rgb.clamp(0, 1)


_CACHE: dict[tuple, LatentRGB] = {}
_LOCK = threading.Lock()
fits = 0  # how many projections were fitted (tests check the cache)


def _vae_identity(pipe) -> tuple:
    folder = os.path.join(str(pipe.folder), "vae")
    names = sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".bin", ".pt", ".pth"))) \
        if os.path.isdir(folder) else []
    stats = [(n, os.stat(os.path.join(folder, n)).st_size, os.stat(os.path.join(folder, n)).st_mtime_ns)
             for n in names]
    return os.path.realpath(folder), tuple(stats), str(pipe.dtype)


def _synthetic_images(count: int, size: int) -> torch.Tensor:
    """Smooth random colour fields plus pure colours, (count, 3, size, size) in [0, 1]."""
    gen = torch.Generator("cpu").manual_seed(1234)
    coarse = torch.rand((count, 3, 3, 3), generator=gen)
    images = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).clamp(0, 1)
    solid = torch.tensor([[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0.5]])
    for i, colour in enumerate(solid[: count // 2]):
        images[i] = colour[:, None, None]
    return images


@torch.no_grad()
def fit_latent_rgb(pipe) -> LatentRGB:
    """The pipe's latent-to-RGB projection (fitted at the first call for its VAE, then cached)."""
    global fits
    key = _vae_identity(pipe)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        vae = pipe.vae
        scale = vae.config.scaling_factor
        images = _synthetic_images(FIT_IMAGES, FIT_SIZE)
        with pipe.placement.use(vae):
            device = next(vae.parameters()).device
            video = (images * 2 - 1)[:, :, None].to(device, pipe.dtype)  # (N, 3, 1, H, W)
            latents = vae.encode(video)[0].mode()
            decoded = vae.decode(latents, return_dict=False)[0]
        target = (decoded.float().cpu()[:, :, 0] / 2 + 0.5).clamp(0, 1)
        target = F.avg_pool2d(target, 8)  # (N, 3, h, w): the colour each latent pixel decodes to
        x = (latents.float().cpu()[:, :, 0] * scale).permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        y = target.permute(0, 2, 3, 1).reshape(-1, 3)
        design = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).double()
        ridge = 1e-4 * torch.eye(design.shape[1], dtype=torch.float64)
        solution = torch.linalg.solve(design.T @ design + ridge, design.T @ y.double())  # (C + 1, 3)
        projection = LatentRGB(solution[:-1].T.float().contiguous(), solution[-1].float().contiguous())
        _CACHE[key] = projection
        fits += 1
        return projection


def preview_frames(latents: torch.Tensor, projection: LatentRGB, max_frames: int = 4) -> torch.Tensor:
    """The first video's latents (B, C, F, h, w) -> uint8 (h, w * n, 3): up to `max_frames` evenly
    spaced latent frames side by side, so the motion shows, not only the first frame."""
    video = latents[0]
    count = min(max_frames, video.shape[1])
    indices = sorted({round(i * (video.shape[1] - 1) / max(count - 1, 1)) for i in range(count)})
    strip = torch.cat([projection(video[:, i]) for i in indices], dim=1)
    return (strip * 255).round().to(torch.uint8)


@torch.no_grad()
def denoised_estimate(scheduler, step_output, sample: torch.Tensor, model_output: torch.Tensor, t) -> torch.Tensor:
    """The scheduler's estimate of the clean latents after a step (what a preview shows): its own
    `pred_original_sample` where it reports one, else from the prediction (flow: x - sigma v;
    epsilon on a DDPM schedule: (x - sqrt(1 - a) eps) / sqrt(a)), else the new sample."""
    estimate = getattr(step_output, "pred_original_sample", None)
    if estimate is not None:
        return estimate.detach()
    config = scheduler.config
    train_steps = config.get("num_train_timesteps", 1000)
    if "FlowMatch" in type(scheduler).__name__ or config.get("prediction_type") == "flow_prediction":
        sigma = float(t) / train_steps
        return (sample - sigma * model_output).detach()
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is not None and config.get("prediction_type", "epsilon") == "epsilon" \
            and float(getattr(scheduler, "init_noise_sigma", 1.0)) == 1.0:
        a = float(alphas[min(max(int(t), 0), len(alphas) - 1)])
        return ((sample - (1 - a) ** 0.5 * model_output) / a ** 0.5).detach()
    return step_output.prev_sample.detach()
