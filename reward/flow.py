"""Optical flow between consecutive frames, differentiable, for the motion-aware rewards.

Two estimators with one interface, `estimator(first, second) -> flow`: first/second (N, 3, H, W)
in [0, 1], flow (N, 2, H, W) in pixels of the input, (dx, dy), such that
`second(x + flow(x)) ~ first(x)` (`warp(second, flow)` reconstructs `first`).

- `PyramidFlow`: weight-free, a classical coarse-to-fine dense Lucas-Kanade: an image pyramid of
  luma, at each level from the coarsest a few Gauss-Newton updates of the flow solving the
  Gaussian-windowed 2x2 normal equations (brightness constancy, Tikhonov-damped so flat regions
  stay at zero), with the second frame warped by the current flow (bilinear) and the flow
  smoothed between updates. Everything is plain tensor maths, so gradients reach both frames.
  Works at any size (the pyramid stops at 8 px); what the tests rank with.
- `RaftFlow`: torchvision's RAFT (`raft_small` / `raft_large`) from a local weights file read
  with `weights_only=True`. RAFT needs at least 128 px and sides divisible by 8: smaller frames
  are upsampled (bilinear) and the flow scaled back to the input's pixels. Weights frozen.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LUMA = (0.299, 0.587, 0.114)
RAFT_VARIANTS = ("raft_small", "raft_large")
RAFT_MIN_SIZE = 128


def to_luma(frames: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(LUMA, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    return (frames * weights).sum(dim=1, keepdim=True)


def _gaussian_kernel(sigma: float, device, dtype) -> torch.Tensor:
    radius = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W), replicate borders."""
    if sigma <= 0:
        return x
    kernel = _gaussian_kernel(sigma, x.device, x.dtype)
    radius = kernel.numel() // 2
    channels = x.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), horizontal, groups=channels)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), vertical, groups=channels)


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences (N, 1, H, W) -> d/dx, d/dy (one-sided at the border)."""
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = 0.5 * (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2])
    gy = 0.5 * (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1])
    return gx, gy


def _base_grid(height: int, width: int, device, dtype) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=dtype),
                            torch.arange(width, device=device, dtype=dtype), indexing="ij")
    return torch.stack([xs, ys], dim=0).unsqueeze(0)  # (1, 2, H, W), pixel coordinates


def sample_coordinates(flow: torch.Tensor) -> torch.Tensor:
    """Pixel coordinates x + flow(x), (N, 2, H, W)."""
    _, _, height, width = flow.shape
    return _base_grid(height, width, flow.device, flow.dtype) + flow


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """image(x + flow(x)) by bilinear interpolation, borders clamped; image (N, C, H, W), flow
    (N, 2, H, W) in pixels. Differentiable in both; a zero flow returns the image exactly."""
    batch, channels, height, width = image.shape
    coords = sample_coordinates(flow)
    x = coords[:, 0].clamp(0, width - 1)
    y = coords[:, 1].clamp(0, height - 1)
    x0 = x.detach().floor().clamp(max=width - 2) if width > 1 else x.detach().floor()
    y0 = y.detach().floor().clamp(max=height - 2) if height > 1 else y.detach().floor()
    wx, wy = (x - x0).unsqueeze(1), (y - y0).unsqueeze(1)
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=width - 1), (y0 + 1).clamp(max=height - 1)
    flat = image.reshape(batch, channels, height * width)

    def at(yy, xx):
        index = (yy * width + xx).reshape(batch, 1, -1).expand(-1, channels, -1)
        return flat.gather(2, index).reshape(batch, channels, height, width)

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def inside_mask(flow: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """1 where x + flow(x) lands inside the frame (by `margin` pixels), else 0; (N, 1, H, W), no gradient."""
    _, _, height, width = flow.shape
    coords = sample_coordinates(flow.detach())
    inside = ((coords[:, 0] >= margin) & (coords[:, 0] <= width - 1 - margin)
              & (coords[:, 1] >= margin) & (coords[:, 1] <= height - 1 - margin))
    return inside.unsqueeze(1).to(flow.dtype)


def _downsample(x: torch.Tensor) -> torch.Tensor:
    # Blur then halve: an anti-aliased pyramid level (odd sizes round up).
    return F.interpolate(gaussian_blur(x, 1.0), scale_factor=0.5, mode="bilinear", align_corners=False,
                         recompute_scale_factor=False)


def _upsample_flow(flow: torch.Tensor, height: int, width: int) -> torch.Tensor:
    scale_x = width / flow.shape[-1]
    scale_y = height / flow.shape[-2]
    up = F.interpolate(flow, size=(height, width), mode="bilinear", align_corners=False)
    return torch.cat([up[:, :1] * scale_x, up[:, 1:] * scale_y], dim=1)


class PyramidFlow(nn.Module):
    """Weight-free coarse-to-fine Lucas-Kanade (see the module doc).

    `window`: sigma (pixels) of the Gaussian window of the normal equations; `iterations`: warps
    per level; `damping`: Tikhonov term added to the structure tensor (in squared luma units per
    pixel: below it the image is "flat" and the update shrinks to 0); `min_size`: the coarsest
    level's shortest side; `max_size`: frames with a longer side are estimated at that size (the
    flow is scaled back to the input's pixels).
    """

    name = "pyramid"

    def __init__(self, window: float = 2.0, iterations: int = 4, damping: float = 1e-3, min_size: int = 8,
                 max_size: int = 256, smoothing: float = 1.0, normalize_sigma: float = 4.0,
                 max_step: float = 1.0, contrast_floor: float = 0.005):
        super().__init__()
        self.window, self.iterations, self.damping = float(window), int(iterations), float(damping)
        self.min_size, self.max_size, self.smoothing = int(min_size), int(max_size), float(smoothing)
        self.normalize_sigma, self.max_step = float(normalize_sigma), float(max_step)
        self.contrast_floor = float(contrast_floor)

    def _normalize(self, luma: torch.Tensor) -> torch.Tensor:
        """Local contrast normalisation: (I - local mean) / (local std + eps). A brightness change
        (flicker, fades: I -> a I + b) then leaves the image unchanged, so it is not read as motion."""
        if self.normalize_sigma <= 0:
            return luma
        mean = gaussian_blur(luma, self.normalize_sigma)
        centred = luma - mean
        std = gaussian_blur(centred * centred, self.normalize_sigma).add(1e-6).sqrt()
        return centred / (std + self.contrast_floor)

    def _level_update(self, first: torch.Tensor, second: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        for _ in range(self.iterations):
            warped = warp(second, flow)
            # Symmetric gradients (average of both frames) converge better than one frame's.
            gx, gy = _gradients(0.5 * (first + warped))
            gt = warped - first
            terms = torch.cat([gx * gx, gx * gy, gy * gy, gx * gt, gy * gt], dim=1)
            a, b, c, p, q = gaussian_blur(terms, self.window).unbind(dim=1)
            a, c = a + self.damping, c + self.damping
            det = a * c - b * b
            du = -(c * p - b * q) / det
            dv = -(a * q - b * p) / det
            step = torch.stack([du, dv], dim=1)
            # At most `max_step` level pixels per update (smoothly): the residual motion at each
            # level is about a pixel; larger steps come from violated brightness constancy.
            length = step.pow(2).sum(dim=1, keepdim=True).add(1e-12).sqrt()
            step = step * (self.max_step * torch.tanh(length / self.max_step) / length)
            flow = flow + step
            if self.smoothing > 0:
                flow = gaussian_blur(flow, self.smoothing)
        return flow

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        if first.shape != second.shape or first.ndim != 4 or first.shape[1] != 3:
            raise ValueError(f"flow needs two (N, 3, H, W) batches of one shape, got {tuple(first.shape)} "
                             f"and {tuple(second.shape)}")
        height, width = first.shape[-2:]
        a, b = to_luma(first.float()), to_luma(second.float())
        scale = min(1.0, self.max_size / max(height, width))
        if scale < 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            a = F.interpolate(a, size=size, mode="bilinear", align_corners=False, antialias=True)
            b = F.interpolate(b, size=size, mode="bilinear", align_corners=False, antialias=True)
        a, b = self._normalize(a), self._normalize(b)
        pyramid = [(a, b)]
        while min(pyramid[-1][0].shape[-2:]) >= 2 * self.min_size:
            pyramid.append((_downsample(pyramid[-1][0]), _downsample(pyramid[-1][1])))
        flow = None
        for level_a, level_b in reversed(pyramid):
            h, w = level_a.shape[-2:]
            flow = level_a.new_zeros(level_a.shape[0], 2, h, w) if flow is None else _upsample_flow(flow, h, w)
            flow = self._level_update(level_a, level_b, flow)
        if flow.shape[-2:] != (height, width):
            flow = _upsample_flow(flow, height, width)
        return flow


class RaftFlow(nn.Module):
    """torchvision RAFT with frozen weights; frames upsampled to at least 128 px, sides to a
    multiple of 8; flow returned in the input's pixels."""

    def __init__(self, model: nn.Module, variant: str, num_flow_updates: int = 12):
        super().__init__()
        self.model = model
        self.name = variant
        self.num_flow_updates = int(num_flow_updates)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        if first.shape != second.shape or first.ndim != 4 or first.shape[1] != 3:
            raise ValueError(f"flow needs two (N, 3, H, W) batches of one shape, got {tuple(first.shape)} "
                             f"and {tuple(second.shape)}")
        height, width = first.shape[-2:]
        scale = max(1.0, RAFT_MIN_SIZE / min(height, width))
        target_h = int(math.ceil(height * scale / 8) * 8)
        target_w = int(math.ceil(width * scale / 8) * 8)
        weight = next(self.model.parameters())
        pair = [x.to(weight.device, torch.float32) for x in (first, second)]
        if (target_h, target_w) != (height, width):
            pair = [F.interpolate(x, size=(target_h, target_w), mode="bilinear", align_corners=False) for x in pair]
        pair = [(2.0 * x - 1.0).to(weight.dtype) for x in pair]  # RAFT takes [-1, 1]
        flow = self.model(pair[0], pair[1], num_flow_updates=self.num_flow_updates)[-1].float()
        # RAFT's flow maps image1 pixels to image2: image2(x + flow) ~ image1(x), our convention too.
        if (target_h, target_w) != (height, width):
            flow = _upsample_flow(flow, height, width)
        return flow.to(first.device)


def raft_variant_of(state_dict: dict) -> str:
    """raft_large has a 256-wide feature encoder output, raft_small 128 (read from the weights)."""
    weight = state_dict.get("feature_encoder.conv.weight")
    if weight is None:
        raise ValueError("not a torchvision RAFT state dict (no feature_encoder.conv.weight)")
    return "raft_large" if weight.shape[0] == 256 else "raft_small"


def build_raft(variant: str) -> nn.Module:
    from torchvision.models.optical_flow import raft_large, raft_small

    if variant not in RAFT_VARIANTS:
        raise ValueError(f"unknown RAFT variant {variant!r}; choose one of {RAFT_VARIANTS}")
    return (raft_small if variant == "raft_small" else raft_large)(weights=None, progress=False)


def load_raft(path: str | os.PathLike, variant: str, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, num_flow_updates: int = 12) -> RaftFlow:
    """RAFT from a torchvision weights file (`raft_small_C_T_V2-01064c6d.pth`, ...), read with
    weights_only=True; the file must hold the `variant`'s weights."""
    path = os.fspath(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read RAFT weights {path}: {e}. Expected torchvision's {variant} weights "
                         f"(a state dict .pth) there.") from e
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path}: expected a RAFT state dict, got {type(state_dict).__name__}")
    found = raft_variant_of(state_dict)
    if found != variant:
        raise ValueError(f"{path} holds {found} weights, not {variant}")
    model = build_raft(variant)
    model.load_state_dict(state_dict, strict=True)
    return RaftFlow(model.to(device=device, dtype=dtype), variant, num_flow_updates)


def consecutive_flows(estimator: nn.Module, video: torch.Tensor) -> torch.Tensor:
    """(F, 3, H, W) frames of ONE video -> (F - 1, 2, H, W) flow from each frame to the next."""
    if video.shape[0] < 2:
        return video.new_zeros(0, 2, *video.shape[-2:])
    return estimator(video[:-1], video[1:])


def flow_error(estimated: torch.Tensor, known: torch.Tensor, margin: int = 0) -> float:
    """Mean end-point error (pixels) between two flows, ignoring `margin` border pixels."""
    if margin:
        estimated = estimated[..., margin:-margin, margin:-margin]
        known = known[..., margin:-margin, margin:-margin]
    return float((estimated - known).pow(2).sum(dim=1).sqrt().mean())


__all__: Sequence[str] = ("PyramidFlow", "RaftFlow", "load_raft", "warp", "inside_mask", "consecutive_flows",
                          "flow_error", "RAFT_VARIANTS")
