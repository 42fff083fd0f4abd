"""Aesthetic v2 / v2.5 rewards on tiny random weights, checked against an independent recomputation:
transformers' full CLIPModel / SiglipModel + their PIL image processors + the head applied as plain
numpy matrix products read straight from the .pth file (the original predictors' recipe)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from easyanimate_reward.reward.aesthetic import (
    V2_5_HEAD_PREFIX,
    V2_HEAD_PREFIX,
    AestheticV2Reward,
    AestheticV25Reward,
    load_aesthetic_v2,
    load_aesthetic_v2_5,
    load_head,
    V2_LINEAR_POSITIONS,
)
from easyanimate_reward.reward.tiny_aesthetic import (
    tiny_head_state_dict,
    write_tiny_aesthetic_head,
    write_tiny_clip_folder,
    write_tiny_siglip_folder,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("aesthetic")
    return {
        "clip": write_tiny_clip_folder(root / "clip-vit-large-patch14", seed=1),
        "siglip": write_tiny_siglip_folder(root / "siglip-so400m-patch14-384", seed=2),
        "v2_head": write_tiny_aesthetic_head(root / "sac+logos+ava1-l14-linearMSE.pth", "v2", seed=3),
        "v2_5_head": write_tiny_aesthetic_head(root / "aesthetic_predictor_v2_5.pth", "v2.5", seed=4),
    }


@pytest.fixture(scope="module")
def frames():
    # uint8-exact frames of different sizes/aspects content, so PIL sees exactly the same pixels.
    generator = torch.Generator().manual_seed(0)
    coarse = torch.nn.functional.interpolate(torch.rand(2, 3, 6, 8, generator=generator), size=(96, 128), mode="bilinear")
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 128), indexing="ij")
    stripes = (0.5 + 0.5 * torch.sin(40 * xx + 10 * yy)).expand(3, -1, -1)
    ramp = torch.stack([xx, 1 - yy, 0.5 * xx * yy])
    images = torch.cat([coarse, stripes[None], ramp[None]])
    return (images.clamp(0, 1) * 255).round() / 255


def numpy_head(path, prefix: str, embedding: np.ndarray) -> np.ndarray:
    """The head as the original scripts use it: L2-normalise, then every Linear in index order."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    x = embedding / np.linalg.norm(embedding, axis=-1, keepdims=True)
    indices = sorted({int(key.split(".")[1]) for key in state if key.startswith(prefix + ".")})
    for index in indices:
        weight = state[f"{prefix}.{index}.weight"].float().numpy().astype(np.float64)
        bias = state[f"{prefix}.{index}.bias"].float().numpy().astype(np.float64)
        x = x @ weight.T + bias
    return x[:, 0]


def pil_images(frames: torch.Tensor):
    from PIL import Image

    arrays = (frames.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def features(output) -> torch.Tensor:
    # transformers 4.x returns a tensor from get_image_features, 5.x an output object.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_v2_matches_reference_pipeline(files, frames):
    from transformers import CLIPImageProcessor, CLIPModel

    reward = load_aesthetic_v2(files["clip"], files["v2_head"])
    assert isinstance(reward, AestheticV2Reward) and reward.image_size == 224
    full = CLIPModel.from_pretrained(str(files["clip"])).eval()
    processor = CLIPImageProcessor()  # defaults = OpenAI CLIP: shortest side 224 bicubic, centre crop, OpenAI mean/std
    pixels = processor(images=pil_images(frames), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref_embedding = features(full.get_image_features(pixel_values=pixels)).double().numpy()
        ours_embedding = reward.normalized_embedding(frames).double().numpy()
        ours = reward(frames, ["ignored"]).numpy()
    ref = numpy_head(files["v2_head"], V2_HEAD_PREFIX, ref_embedding)

    ref_unit = ref_embedding / np.linalg.norm(ref_embedding, axis=-1, keepdims=True)
    assert np.allclose(np.linalg.norm(ours_embedding, axis=-1), 1.0, atol=1e-6)
    assert (ref_unit * ours_embedding).sum(-1).min() > 0.999  # torch vs PIL resize: close, not bit-equal
    assert np.abs(ours - ref).max() < 0.01  # measured ~0.002
    assert np.ptp(ref) > 0.1  # the images really score differently, so the comparison means something


def test_v2_head_exact_on_identical_pixels(files, frames):
    """Same pixel_values into both: only the model/head arithmetic differs, so agreement is tight."""
    from transformers import CLIPModel

    reward = load_aesthetic_v2(files["clip"], files["v2_head"])
    full = CLIPModel.from_pretrained(str(files["clip"])).eval()
    with torch.no_grad():
        pixels = reward.pixel_values(frames)
        ref = numpy_head(files["v2_head"], V2_HEAD_PREFIX, features(full.get_image_features(pixel_values=pixels)).double().numpy())
        ours = reward(frames).double().numpy()
    assert np.abs(ours - ref).max() < 1e-4


def test_v2_5_matches_reference_pipeline(files, frames):
    from transformers import SiglipImageProcessor, SiglipModel

    reward = load_aesthetic_v2_5(files["siglip"], files["v2_5_head"])
    assert isinstance(reward, AestheticV25Reward) and reward.image_size == 384
    full = SiglipModel.from_pretrained(str(files["siglip"])).eval()
    processor = SiglipImageProcessor(size={"height": 384, "width": 384})  # bicubic squash, mean = std = 0.5
    pixels = processor(images=pil_images(frames), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref_embedding = features(full.get_image_features(pixel_values=pixels)).double().numpy()
        exact_embedding = features(full.get_image_features(pixel_values=reward.pixel_values(frames))).double().numpy()
        ours = reward(frames).double().numpy()
    ref = numpy_head(files["v2_5_head"], V2_5_HEAD_PREFIX, ref_embedding)
    exact = numpy_head(files["v2_5_head"], V2_5_HEAD_PREFIX, exact_embedding)
    assert np.abs(ours - exact).max() < 1e-4
    assert np.abs(ours - ref).max() < 0.01  # measured ~0.0002
    assert np.ptp(ref) > 0.1


@pytest.mark.parametrize("version", ["v2", "v2.5"])
def test_gradients_reach_frames_not_weights(files, version):
    reward = (
        load_aesthetic_v2(files["clip"], files["v2_head"])
        if version == "v2"
        else load_aesthetic_v2_5(files["siglip"], files["v2_5_head"])
    )
    x = torch.rand(2, 3, 40, 56, requires_grad=True)
    reward(x, ["a", "b"]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in reward.parameters())
    reward.train()  # a trainer calling .train() must not switch the judge out of eval mode
    assert not any(m.training for m in reward.modules())


def test_public_key_layout_and_widths():
    # Key names and dtypes of the public files (christophschuhmann/improved-aesthetic-predictor,
    # discus0434/aesthetic-predictor-v2-5): Linear layers sit between dropouts at these indices.
    v2 = tiny_head_state_dict("v2", in_width=768)
    assert sorted(v2) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    assert [tuple(v2[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)] == [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    v25 = tiny_head_state_dict("v2.5", in_width=1152)
    assert sorted(v25) == sorted(f"scoring_head.{i}.{p}" for i in (0, 2, 4, 6, 8) for p in ("weight", "bias"))
    assert v25["scoring_head.0.weight"].shape == (1024, 1152) and v25["scoring_head.0.weight"].dtype == torch.bfloat16


def test_bad_heads_are_refused(files, tmp_path):
    wrong_keys = tmp_path / "wrong.pth"
    torch.save({f"scoring_head.{k[len('layers.'):]}": v for k, v in tiny_head_state_dict("v2").items()}, wrong_keys)
    with pytest.raises(ValueError, match="missing"):
        load_head(wrong_keys, V2_HEAD_PREFIX, V2_LINEAR_POSITIONS)
    wide = write_tiny_aesthetic_head(tmp_path / "wide.pth", "v2", in_width=48)
    with pytest.raises(ValueError, match="expects 48-wide"):
        load_aesthetic_v2(files["clip"], wide)
    pickled = tmp_path / "pickled.pth"
    torch.save({"layers": torch.nn.Linear(2, 1)}, pickled)  # a pickled module: weights_only refuses it
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        load_head(pickled, V2_HEAD_PREFIX, V2_LINEAR_POSITIONS)


def test_bfloat16_backbone_close_to_float32(files, frames):
    full = load_aesthetic_v2(files["clip"], files["v2_head"])
    half = load_aesthetic_v2(files["clip"], files["v2_head"], dtype=torch.bfloat16)
    assert next(half.backbone.parameters()).dtype == torch.bfloat16
    assert half.head[0].weight.dtype == torch.float32  # head and L2 norm stay in float32
    with torch.no_grad():
        # measured max |bf16 - fp32| = 0.0038 on scores of about 4.2-4.6
        assert torch.allclose(half(frames), full(frames), atol=0.01)
