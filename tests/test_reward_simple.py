"""Weight-free rewards against plain numpy / PIL references, plus gradients and WeightedReward."""

from __future__ import annotations

import colorsys
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from easyanimate_reward.reward.base import WeightedReward
from easyanimate_reward.reward.simple import (
    SIMPLE_REWARDS,
    ColorfulnessReward,
    CompressibilityReward,
    ContrastReward,
    SaturationReward,
    SharpnessReward,
    SharpnessReward as _Sharpness,
    TemporalConsistencyReward,
    blockwise_dct,
    dct_matrix,
    jpeg_quant_table,
    JPEG_LUMA_TABLE,
)


def random_frames(count=3, height=24, width=32, seed=0):
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(seed))


def to_numpy(frames: torch.Tensor) -> np.ndarray:
    return frames.double().numpy()


def test_colorfulness_matches_hasler_suesstrunk():
    frames = random_frames()
    rgb = to_numpy(frames) * 255
    rg = (rgb[:, 0] - rgb[:, 1]).reshape(len(rgb), -1)
    yb = (0.5 * (rgb[:, 0] + rgb[:, 1]) - rgb[:, 2]).reshape(len(rgb), -1)
    expected = np.sqrt(rg.std(1) ** 2 + yb.std(1) ** 2) + 0.3 * np.sqrt(rg.mean(1) ** 2 + yb.mean(1) ** 2)
    assert np.allclose(ColorfulnessReward()(frames).numpy(), expected, rtol=1e-6, atol=0)  # 1e-7 measured
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    # Pure red: no spread, mean (rg, yb) = (255, 127.5) -> 0.3 * |(255, 127.5)|
    assert ColorfulnessReward()(red).item() == pytest.approx(0.3 * np.hypot(255, 127.5), rel=1e-4)
    assert ColorfulnessReward()(torch.full((1, 3, 8, 8), 0.4)).item() < 0.01


def test_saturation_matches_hsv():
    frames = random_frames(2, 6, 5)
    pixels = to_numpy(frames).transpose(0, 2, 3, 1).reshape(2, -1, 3)
    expected = [np.mean([colorsys.rgb_to_hsv(*p)[1] for p in image]) for image in pixels]
    assert np.allclose(SaturationReward()(frames).numpy(), expected, rtol=0, atol=5e-6)  # 1.2e-6 measured


def test_contrast_is_luma_std():
    frames = random_frames()
    rgb = to_numpy(frames)
    y = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    assert np.allclose(ContrastReward()(frames).numpy(), y.reshape(len(y), -1).std(1), rtol=5e-5, atol=0)  # 1.3e-5


def test_sharpness_prefers_clean_edges_over_noise():
    size = 64
    rects = torch.zeros(1, 3, size, size)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        x0, y0, w, h = torch.randint(0, 48, (4,), generator=generator).tolist()
        rects[..., y0:y0 + h // 2 + 4, x0:x0 + w // 2 + 4] = torch.rand(3, 1, 1, generator=generator)
    noise = torch.rand(1, 3, size, size, generator=generator)
    noisy_rects = (rects + 0.1 * torch.randn(1, 3, size, size, generator=generator)).clamp(0, 1)
    blurred = F.avg_pool2d(F.pad(rects, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    sharp = SharpnessReward()
    # clean edges > the same edges with grain > pure noise; blur lowers it; a flat frame is 0
    assert sharp(rects) > sharp(noisy_rects) > sharp(noise)
    assert sharp(rects) > 4 * sharp(noise)  # measured 7.8x
    assert sharp(blurred) < sharp(rects)
    assert sharp(torch.full((1, 3, 8, 8), 0.3)).item() == pytest.approx(0.0, abs=1e-10)
    # The classic Laplacian energy is the noise-prone one (noise 0.71 vs edges 0.03).
    laplacian = SharpnessReward(method="laplacian")
    assert laplacian(noise) > 10 * laplacian(rects)
    x = rects.clone().requires_grad_(True)
    sharp(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_laplacian_sharpness_is_laplacian_energy_and_drops_with_blur():
    SharpnessReward = lambda: _Sharpness(method="laplacian")  # noqa: E731
    frames = random_frames()
    rgb = to_numpy(frames)
    y = np.pad(0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2], ((0, 0), (1, 1), (1, 1)), mode="edge")
    lap = y[:, :-2, 1:-1] + y[:, 2:, 1:-1] + y[:, 1:-1, :-2] + y[:, 1:-1, 2:] - 4 * y[:, 1:-1, 1:-1]
    assert np.allclose(SharpnessReward()(frames).numpy(), (lap**2).reshape(len(lap), -1).mean(1), rtol=1e-6, atol=0)
    blurred = F.avg_pool2d(F.pad(frames, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    assert (SharpnessReward()(blurred) < SharpnessReward()(frames)).all()
    assert SharpnessReward()(torch.full((1, 3, 8, 8), 0.3)).item() == pytest.approx(0.0, abs=1e-10)


def test_dct_is_jpeg_fdct():
    basis = dct_matrix(8)
    assert torch.allclose(basis @ basis.T, torch.eye(8), atol=1e-6)
    flat = torch.full((1, 8, 8), 10.0)
    coefficients = blockwise_dct(flat, basis)[0, 0]
    assert coefficients[0, 0].item() == pytest.approx(80.0, rel=1e-5)  # DC = 8 x mean for the orthonormal DCT
    assert coefficients.flatten()[1:].abs().max() < 1e-5  # 1.3e-6 measured
    # IJG quality scaling: 50 is the base table, 75 halves it (rounded), 100 is all ones.
    assert torch.equal(jpeg_quant_table(JPEG_LUMA_TABLE, 50), torch.tensor(JPEG_LUMA_TABLE, dtype=torch.float32))
    assert jpeg_quant_table(JPEG_LUMA_TABLE, 75)[0, 0].item() == 8
    assert jpeg_quant_table(JPEG_LUMA_TABLE, 100).max().item() == 1


def varied_images(size: int = 64, seed: int = 0) -> torch.Tensor:
    """~20 images spanning flat, smooth, textured, noisy and periodic content."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = [torch.full((3, size, size), 0.5), torch.stack([xx, yy, 1 - xx])]
    for blur in (1, 2, 4, 8, 16):  # value noise at several scales
        noise = torch.rand(1, 3, size // blur, size // blur, generator=g)
        images.append(F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)[0])
    for amplitude in (0.02, 0.05, 0.1, 0.3, 1.0):  # white noise of several strengths
        images.append(0.5 + amplitude * (torch.rand(3, size, size, generator=g) - 0.5))
    for period in (2, 4, 8, 16, 32):  # stripes
        images.append(((xx * size // period) % 2).expand(3, -1, -1) * 0.8 + 0.1)
    for frequency in (3, 12):  # smooth waves
        images.append((0.5 + 0.4 * torch.sin(frequency * 6.28 * xx) * torch.cos(frequency * 3.14 * yy)).expand(3, -1, -1))
    # quantise to what the JPEG encoder will see
    return (torch.stack(images).clamp(0, 1) * 255).round() / 255


def jpeg_bytes(image: torch.Tensor, quality: int = 75) -> int:
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.tell()


def spearman(a, b) -> float:
    rank_a = np.argsort(np.argsort(a))
    rank_b = np.argsort(np.argsort(b))
    return float(np.corrcoef(rank_a, rank_b)[0, 1])


@pytest.mark.parametrize("quality", [75, 90])
def test_compressibility_ranks_like_real_jpeg_size(quality):
    images = varied_images()
    assert len(images) >= 19
    sizes = np.array([jpeg_bytes(image, quality) for image in images])
    with torch.no_grad():
        scores = CompressibilityReward(quality=quality)(images).numpy()
    # higher reward = smaller file (measured rank correlation: 0.946 at quality 75, 0.963 at 90)
    assert spearman(-scores, sizes) > 0.92


def test_temporal_consistency_per_frame_numbers():
    video = torch.zeros(4, 3, 2, 2)
    video[2] = 1.0  # frame 2 differs from its neighbours by 1 everywhere
    l1 = TemporalConsistencyReward()(video)
    # neighbour differences: (0,1)=0, (1,2)=1, (2,3)=1 -> frame scores -0, -(0+1)/2, -(1+1)/2, -1
    assert torch.allclose(l1, torch.tensor([0.0, -0.5, -1.0, -1.0]))
    static = TemporalConsistencyReward()(torch.rand(1, 3, 4, 4).expand(5, -1, -1, -1))
    assert torch.equal(static, torch.zeros(5))
    # two 2-frame videos: nothing is compared across the video boundary (frames 1 and 2)
    two = torch.cat([torch.zeros(2, 3, 2, 2), torch.ones(2, 3, 2, 2)])
    assert torch.equal(TemporalConsistencyReward(frames_per_video=2)(two), torch.zeros(4))
    assert TemporalConsistencyReward()(two)[1].item() == -0.5  # as one video, frame 1 sees the jump
    half = torch.full((2, 3, 2, 2), 0.5)
    half[1] = 0.0
    assert torch.allclose(TemporalConsistencyReward(metric="l2")(half), torch.tensor([-0.25, -0.25]))
    assert TemporalConsistencyReward()(torch.rand(1, 3, 4, 4)).tolist() == [0.0]
    with pytest.raises(ValueError, match="whole number"):
        TemporalConsistencyReward(frames_per_video=3)(torch.rand(4, 3, 2, 2))


@pytest.mark.parametrize("kind", sorted(SIMPLE_REWARDS))
def test_gradients_finite_and_nonzero(kind):
    reward = SIMPLE_REWARDS[kind]()
    frames = random_frames(4, 20, 28, seed=1).requires_grad_(True)
    scores = reward(frames, ["ignored"])
    assert scores.shape == (4,) and scores.dtype == torch.float32
    scores.sum().backward()
    assert torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0
    # flat frames are the edge case for sqrt / max-min: gradients must stay finite there too
    flat = torch.full((2, 3, 16, 16), 0.5, requires_grad=True)
    reward(flat).sum().backward()
    assert torch.isfinite(flat.grad).all()


def test_weighted_reward_numbers():
    frames = random_frames()
    colour, contrast, temporal = ColorfulnessReward(), ContrastReward(), TemporalConsistencyReward()
    combined = WeightedReward([(colour, 0.5), (contrast, 10.0), (temporal, -2.0)])
    expected = 0.5 * colour(frames) + 10.0 * contrast(frames) - 2.0 * temporal(frames)
    assert torch.allclose(combined(frames, ["p"]), expected)
    assert combined.name == "0.5*colorfulness + 10*contrast + -2*frame_difference"
    frames.requires_grad_(True)
    combined(frames).sum().backward()
    assert frames.grad.abs().sum() > 0
