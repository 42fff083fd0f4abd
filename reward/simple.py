"""Weight-free differentiable rewards: image statistics that need no checkpoint.

They are honest, cheap objectives for demos and tests (and useful regularisers next to a learned
reward). Every class follows the `Reward` contract: frames (B, 3, H, W) in [0, 1] -> (B,) float32,
differentiable with respect to the frames. Prompts are accepted and ignored.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .base import Reward

# ITU-R BT.601 luma weights (what JPEG's YCbCr and most "grayscale" conversions use).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
EPS = 1e-6


def luma(frames: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) BT.601 luma, same range as the input."""
    weights = torch.tensor(LUMA_WEIGHTS, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    return (frames * weights).sum(dim=1, keepdim=True)


def _smooth_sqrt(x: torch.Tensor) -> torch.Tensor:
    # sqrt has an infinite slope at 0 (a flat grey image): keep gradients finite.
    return torch.sqrt(x + EPS)


class ColorfulnessReward(Reward):
    """Hasler & Suesstrunk (2003) colourfulness metric M.

    rg = R - G, yb = (R + G) / 2 - B over all pixels of a frame;
    M = sqrt(std_rg^2 + std_yb^2) + 0.3 * sqrt(mean_rg^2 + mean_yb^2).
    Pixels are scaled to 0..255 (`pixel_scale`) so the numbers match the paper's scale
    (about 0 for grey, ~33 "moderately", >109 "extremely colourful").
    """

    name = "colorfulness"

    def __init__(self, pixel_scale: float = 255.0):
        super().__init__()
        self.pixel_scale = float(pixel_scale)

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        rgb = frames.float() * self.pixel_scale
        red, green, blue = rgb[:, 0], rgb[:, 1], rgb[:, 2]
        rg = (red - green).flatten(1)
        yb = (0.5 * (red + green) - blue).flatten(1)
        spread = _smooth_sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False))
        offset = _smooth_sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
        return spread + 0.3 * offset


class SaturationReward(Reward):
    """Mean HSV saturation, (max - min) / max per pixel, in [0, 1]."""

    name = "saturation"

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        rgb = frames.float()
        high = rgb.amax(dim=1)
        low = rgb.amin(dim=1)
        saturation = (high - low) / (high + EPS)
        return saturation.flatten(1).mean(dim=1)


class ContrastReward(Reward):
    """RMS contrast: standard deviation of luma over the frame (0 for a flat frame, at most 0.5)."""

    name = "contrast"

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        y = luma(frames.float()).flatten(1)
        return _smooth_sqrt(y.var(dim=1, unbiased=False))


class SharpnessReward(Reward):
    """Sharpness of edges: gradient energy weighted by how edge-like the neighbourhood is.

    method "edges" (default): per pixel, the structure tensor of luma (central-difference
    gradients, Gaussian window sigma `window`) gives the gradient energy trace = l1 + l2 and the
    coherence ((l1 - l2) / (l1 + l2))^`coherence_power`, 1 on a straight edge and near 0 for noise
    (random gradient directions); the score is the mean of energy x coherence. Clean edges score
    high, the same edges blurred lower, pure noise lowest (a 64 px test: clean rectangles 0.0035,
    blurred 0.0012, uniform noise 0.00045, rectangles + noise 0.0020): it cannot be raised by
    adding grain.
    method "laplacian": the classic focus measure, mean squared 3x3 Laplacian response. It is
    noise-prone (pure noise 0.71 vs clean edges 0.03 on the same test): kept for comparison, not
    for training.

    Measured at the frame's own resolution (per-pixel gradients): compare frames of one size.
    """

    name = "sharpness"
    METHODS = ("edges", "laplacian")

    def __init__(self, method: str = "edges", window: float = 1.5, coherence_power: float = 4.0):
        super().__init__()
        if method not in self.METHODS:
            raise ValueError(f"sharpness method must be one of {self.METHODS}, got {method!r}")
        self.method, self.window, self.coherence_power = method, float(window), float(coherence_power)
        kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
        self.register_buffer("laplacian", kernel, persistent=False)

    def _laplacian_energy(self, y: torch.Tensor) -> torch.Tensor:
        # Replicate padding: the border must not look like an edge.
        response = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), self.laplacian.to(y.device))
        return response.pow(2).flatten(1).mean(dim=1)

    def _edge_energy(self, y: torch.Tensor) -> torch.Tensor:
        from .flow import gaussian_blur

        padded = F.pad(y, (1, 1, 1, 1), mode="replicate")
        gx = 0.5 * (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2])
        gy = 0.5 * (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1])
        a, b, c = gaussian_blur(torch.cat([gx * gx, gx * gy, gy * gy], dim=1), self.window).unbind(dim=1)
        trace = a + c
        spread = torch.sqrt((a - c) ** 2 + 4 * b * b + 1e-12)
        coherence = (spread / (trace + 1e-6)).pow(self.coherence_power)
        return (trace * coherence).flatten(1).mean(dim=1)

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        y = luma(frames.float())
        return self._laplacian_energy(y) if self.method == "laplacian" else self._edge_energy(y)


# --- JPEG compressibility proxy ---------------------------------------------------------------

# Standard JPEG quantisation tables (ITU T.81 Annex K), natural (row-major) order.
JPEG_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
# The chroma table is 99 everywhere but its top-left corner.
_JPEG_CHROMA_CORNER = ((17, 18, 24, 47), (18, 21, 26, 66), (24, 26, 56, 99), (47, 66, 99, 99))
JPEG_CHROMA_TABLE = tuple(row + (99,) * 4 for row in _JPEG_CHROMA_CORNER) + ((99,) * 8,) * 4


def jpeg_quant_table(base: Sequence[Sequence[int]], quality: int) -> torch.Tensor:
    """The IJG (libjpeg) scaling of a base table to a quality 1..100 (PIL's default is 75)."""
    quality = min(max(int(quality), 1), 100)
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    table = torch.tensor(base, dtype=torch.float32)
    return torch.clamp(torch.floor((table * scale + 50) / 100), 1, 255)


def dct_matrix(n: int = 8) -> torch.Tensor:
    """Orthonormal DCT-II basis, rows = frequencies: coefficients = D @ block @ D.T (JPEG's FDCT)."""
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    basis = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    return basis.float()


def blockwise_dct(plane: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, nblocks, 8, 8) DCT coefficients of 8x8 blocks (edge-replicated to a multiple of 8)."""
    batch, height, width = plane.shape
    pad_h, pad_w = (-height) % 8, (-width) % 8
    if pad_h or pad_w:
        # JPEG encoders extend partial blocks by repeating the edge, which costs few bits.
        plane = F.pad(plane.unsqueeze(1), (0, pad_w, 0, pad_h), mode="replicate").squeeze(1)
    blocks = plane.unfold(1, 8, 8).unfold(2, 8, 8).reshape(batch, -1, 8, 8)
    return basis @ blocks @ basis.T


class CompressibilityReward(Reward):
    """Differentiable proxy for JPEG compressibility: minus the estimated bits per pixel.

    Like a baseline JPEG encoder (4:2:0): YCbCr on the 0..255 scale, chroma averaged 2x2,
    blockwise 8x8 DCT, divided by the quality-scaled standard quantisation tables. A quantised AC
    coefficient m = |c| / q survives rounding when m > 0.5; a smooth version of that test
    (sigmoid with temperature `softness`) counts the significant coefficients, each costing
    about `bits_per_coefficient` bits for its run-length/Huffman symbol, plus log2(1 + m) bits for
    its magnitude. DC terms are ignored (differentially coded, nearly constant cost).
    Higher reward = smaller JPEG file (what DDPO's "compressibility" reward asks for).
    """

    name = "compressibility"

    def __init__(self, quality: int = 75, softness: float = 0.1, bits_per_coefficient: float = 4.0):
        super().__init__()
        self.softness = float(softness)
        self.bits_per_coefficient = float(bits_per_coefficient)
        self.register_buffer("basis", dct_matrix(8), persistent=False)
        self.register_buffer("luma_q", jpeg_quant_table(JPEG_LUMA_TABLE, quality), persistent=False)
        self.register_buffer("chroma_q", jpeg_quant_table(JPEG_CHROMA_TABLE, quality), persistent=False)
        ac_mask = torch.ones(8, 8)
        ac_mask[0, 0] = 0.0
        self.register_buffer("ac_mask", ac_mask, persistent=False)

    def _plane_bits(self, plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        coefficients = blockwise_dct(plane, self.basis.to(plane.device))
        magnitude = coefficients.abs() / table.to(plane.device)
        significant = torch.sigmoid((magnitude - 0.5) / self.softness)
        bits = self.bits_per_coefficient * significant + torch.log2(1.0 + magnitude) * significant
        return (bits * self.ac_mask.to(plane.device)).flatten(1).sum(dim=1)

    def estimated_bits(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B,) estimated size of the JPEG entropy-coded data in bits."""
        rgb = frames.float() * 255.0
        red, green, blue = rgb[:, 0], rgb[:, 1], rgb[:, 2]
        y = 0.299 * red + 0.587 * green + 0.114 * blue - 128.0
        cb = -0.168736 * red - 0.331264 * green + 0.5 * blue
        cr = 0.5 * red - 0.418688 * green - 0.081312 * blue
        chroma = F.avg_pool2d(torch.stack([cb, cr], dim=1), 2, ceil_mode=True)
        total = self._plane_bits(y, self.luma_q)
        total = total + self._plane_bits(chroma[:, 0], self.chroma_q) + self._plane_bits(chroma[:, 1], self.chroma_q)
        return total

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = frames.shape[-2] * frames.shape[-1]
        return -self.estimated_bits(frames) / pixels


class TemporalConsistencyReward(Reward):
    """Minus the mean difference between neighbouring frames of a video, per frame: kind
    "frame_difference". NOT motion compensated: it penalises a smooth pan as much as flicker (a
    30% flicker scores better than a 2-pixel pan), so a negative weight on it pays for freezing the
    video. The kind "temporal_consistency" (reward/video.py) warps by the optical flow first.

    Frames of one video are consecutive along B; `frames_per_video` splits B into videos (None:
    the whole batch is one video), so no difference is taken across two videos. A frame's score
    is minus the average of its differences to its previous and next frame (one neighbour at the
    ends; 0 for a single-frame video). `metric`: "l1" (mean |a - b|) or "l2" (mean (a - b)^2).
    """

    name = "frame_difference"
    whole_video = True  # compares frames with each other: batch scorers must not split a video

    def __init__(self, frames_per_video: int | None = None, metric: str = "l1"):
        super().__init__()
        if metric not in ("l1", "l2"):
            raise ValueError(f"metric must be 'l1' or 'l2', got {metric!r}")
        if frames_per_video is not None and frames_per_video < 1:
            raise ValueError(f"frames_per_video must be >= 1, got {frames_per_video}")
        self.frames_per_video = frames_per_video
        self.metric = metric

    def _video_scores(self, video: torch.Tensor) -> torch.Tensor:
        count = video.shape[0]
        if count == 1:
            return video.sum() * 0.0 + torch.zeros(1, device=video.device)  # keeps the graph connected
        delta = video[1:] - video[:-1]
        step = delta.abs() if self.metric == "l1" else delta.pow(2)
        step = step.flatten(1).mean(dim=1)  # (count - 1,) difference between frame t and t+1
        zero = step.new_zeros(1)
        before = torch.cat([zero, step])  # difference to the previous frame (none for the first)
        after = torch.cat([step, zero])  # difference to the next frame (none for the last)
        neighbours = torch.full((count,), 2.0, device=video.device)
        neighbours[0] = neighbours[-1] = 1.0
        return -(before + after) / neighbours

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        frames = frames.float()
        total = frames.shape[0]
        length = self.frames_per_video or total
        if total % length:
            raise ValueError(f"{self.name}: batch of {total} frames is not a whole number of {length}-frame videos")
        return torch.cat([self._video_scores(video) for video in frames.split(length)])


SIMPLE_REWARDS = {
    "colorfulness": ColorfulnessReward,
    "saturation": SaturationReward,
    "contrast": ContrastReward,
    "sharpness": SharpnessReward,
    "compressibility": CompressibilityReward,
    "frame_difference": TemporalConsistencyReward,
}
