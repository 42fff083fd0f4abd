"""Differentiable torch preprocessing for CLIP-family reward models.

Reference processors (PIL + torchvision / transformers) are not differentiable and loop per image.
Here everything is batched tensor maths on frames (B, 3, H, W) in [0, 1], so gradients reach the
frames. Resizing always uses `F.interpolate(mode="bicubic", antialias=True, align_corners=False)`:
PIL's bicubic filter low-passes when shrinking, and without antialias the error against the
reference processors is several times larger.

Modes of `resize_for_clip` (output is always size x size):
- "crop": shortest side to `size` (other side `int(size * long / short)`, as torchvision's and
  transformers' resize compute it), then a centre crop (top/left offset `(extra) // 2`, as
  transformers' CLIPImageProcessor). What OpenAI CLIP, PickScore and open_clip's default do.
- "letterbox": longest side to `size` (other side `round(size * short / long)`), then pad to a
  square with the image centred (left/top pad `pad // 2`, the remainder right/bottom). The pad
  value is 0.0 in [0, 1] pixel space, i.e. BLACK before normalisation: HPS v2's official
  validation transform (`ResizeMaxSize(fill=0)` in HPSv2's bundled open_clip) pads the [0, 1]
  tensor with 0 before `Normalize`, so black borders are what HPS was trained and evaluated on.
- "squash": both sides to `size`, aspect ratio not kept (what Aesthetic v2.5 / SigLIP do).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

RESIZE_MODES = ("crop", "letterbox", "squash")
LETTERBOX_FILL = 0.0  # black in [0, 1] space, as HPS v2's ResizeMaxSize(fill=0) before Normalize


def _bicubic(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if frames.shape[-2:] == (height, width):
        return frames
    return F.interpolate(frames, size=(height, width), mode="bicubic", antialias=True, align_corners=False)


def _check_frames(frames: torch.Tensor) -> None:
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected frames (B, 3, H, W), got {tuple(frames.shape)}")


def resize_shortest_and_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    height, width = frames.shape[-2:]
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    resized = _bicubic(frames, new_h, new_w)
    top = (new_h - size) // 2
    left = (new_w - size) // 2
    return resized[..., top : top + size, left : left + size]


def resize_longest_and_pad(frames: torch.Tensor, size: int, fill: float = LETTERBOX_FILL) -> torch.Tensor:
    height, width = frames.shape[-2:]
    scale = size / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    resized = _bicubic(frames, new_h, new_w)
    pad_h, pad_w = size - new_h, size - new_w
    # F.pad order for the last two dims: (left, right, top, bottom).
    padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    if not any(padding):
        return resized
    return F.pad(resized, padding, mode="constant", value=fill)


def resize_for_clip(frames: torch.Tensor, size: int, mode: str = "crop", clamp: bool = True) -> torch.Tensor:
    """frames (B, 3, H, W) in [0, 1] -> (B, 3, size, size), float32, (about) in [0, 1].

    `clamp`: bicubic overshoots slightly past [0, 1] at sharp edges. Processors that resize a
    uint8 PIL image (transformers' CLIPImageProcessor: PickScore, MPS, Aesthetic) clip there, so
    clamping halves our max error against them (the few clipped values get zero gradient, as the
    reference implies). Pipelines that resize the float tensor (HPS v2's ToTensor -> ResizeMaxSize)
    do not clip: use clamp=False there (then "letterbox" equals HPS's transform to float rounding).
    """
    _check_frames(frames)
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {RESIZE_MODES}")
    # Bicubic antialias kernels are not implemented for every half type on every device; resize in
    # float32 and let the reward cast to its own dtype afterwards.
    frames = frames.float()
    if mode == "crop":
        out = resize_shortest_and_crop(frames, size)
    elif mode == "letterbox":
        out = resize_longest_and_pad(frames, size)
    else:
        out = _bicubic(frames, size, size)
    return out.clamp(0.0, 1.0) if clamp else out


def normalize(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel, broadcast over (B, 3, H, W)."""
    mean_t = torch.as_tensor(mean, dtype=frames.dtype, device=frames.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=frames.dtype, device=frames.device).view(1, -1, 1, 1)
    return (frames - mean_t) / std_t


def clip_preprocess(
    frames: torch.Tensor,
    size: int = 224,
    mode: str = "crop",
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    clamp: bool = True,
) -> torch.Tensor:
    """Resize (see module doc for modes) then normalise: the pixel_values a CLIP vision tower wants."""
    return normalize(resize_for_clip(frames, size, mode, clamp=clamp), mean, std)
