"""CLIP-family rewards (HPS v2/v2.1, PickScore, MPS) on tiny random weights in the real file formats.

Parity is checked against the reference implementations on the same weights: open_clip's own CLIP
forward (HPS), transformers' CLIPModel forward (PickScore), an independent functional
re-computation of MPS's formula, transformers' PIL CLIPImageProcessor and HPS's official
torchvision transform (preprocessing).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from easyanimate_reward.reward import hps, mps, pickscore, tiny_clip
from easyanimate_reward.reward.clip_text import open_clip_tokenizer, tokenizer_for_folder, write_clip_tokenizer_files
from easyanimate_reward.reward.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    clip_preprocess,
    resize_for_clip,
)
from easyanimate_reward.tools.convert_mps_checkpoint import convert_mps_checkpoint

PROMPTS = ["a red fox jumping over a frozen river", "a bowl of ramen, studio light"]


def realish_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (H, W, 3): smooth gradients, hard-edged discs, mild noise (edges + texture, like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    img = np.stack([0.5 + 0.4 * np.sin(6 * x + 2 * y), 0.5 + 0.4 * np.cos(9 * y), 0.3 + 0.5 * x * y], axis=-1)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(10, 50)
        disc = (y * max(height, width) - cy) ** 2 + (x * max(height, width) - cx) ** 2 < r * r
        img[disc] = rng.uniform(0, 1, 3)
    img = img + rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def to_frames(*arrays: np.ndarray) -> torch.Tensor:
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays])


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    return to_frames(realish_image(180, 240, seed=1), realish_image(180, 240, seed=2))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_rewards")
    hps_ckpt, hps_config = tiny_clip.write_tiny_hps_checkpoint(root / "hps", seed=3)
    return {
        "hps": hps_ckpt,
        "hps_config": hps_config,
        "pickscore": tiny_clip.write_tiny_pickscore_folder(root / "pickscore", seed=4),
        "mps": tiny_clip.write_tiny_mps_checkpoint(root / "mps", seed=5),
        "root": root,
    }


@pytest.fixture(scope="module")
def hps_reward(files):
    return hps.load_hps(files["hps"], "v2.1", model_name=files["hps_config"])


@pytest.fixture(scope="module")
def pick_reward(files):
    return pickscore.load_pickscore(files["pickscore"])


@pytest.fixture(scope="module")
def mps_reward(files):
    return mps.load_mps(files["mps"], clip_config=tiny_clip.TINY_HF_CLIP_CONFIG)


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", [(240, 320), (480, 360), (300, 300), (200, 500), (600, 800)])
def test_crop_matches_transformers_pil_processor(size):
    """Tolerance: max |diff| < 0.25 and mean |diff| < 0.01 in normalised units (0.25 ~ 0.07 of the
    [0, 1] range, only at a few hard edges; PIL rounds to uint8 between its two resize passes)."""
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    arr = realish_image(*size)
    reference = CLIPImageProcessorPil()(Image.fromarray(arr), return_tensors="np")["pixel_values"]
    reference = torch.from_numpy(np.asarray(reference))
    ours = clip_preprocess(to_frames(arr), 224, "crop")
    assert ours.shape == reference.shape == (1, 3, 224, 224)
    diff = (ours - reference).abs()
    assert diff.max().item() < 0.25
    assert diff.mean().item() < 0.01
    if min(size) < 448:
        return
    # When shrinking 2x or more, antialiasing is what makes this close: plain bicubic is clearly further off.
    h, w = size
    nh, nw = (224, int(224 * w / h)) if h <= w else (int(224 * h / w), 224)
    plain = F.interpolate(to_frames(arr), size=(nh, nw), mode="bicubic", align_corners=False).clamp(0, 1)
    top, left = (nh - 224) // 2, (nw - 224) // 2
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    plain = (plain[..., top : top + 224, left : left + 224] - mean) / std
    assert (plain - reference).abs().mean().item() > 2 * diff.mean().item()


@pytest.mark.parametrize("size", [(240, 320), (480, 360), (200, 500), (300, 300)])
def test_letterbox_matches_hps_official_transform(size):
    """HPS v2 val transform: ToTensor -> ResizeMaxSize(224, fill=0) (torchvision bicubic on the
    tensor, longest side, centred zero padding) -> Normalize. Ours (no clamp) equals it."""
    import torchvision.transforms.functional as TF

    frames = to_frames(realish_image(*size))
    h, w = size
    scale = 224 / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    resized = TF.resize(frames[0], [nh, nw], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    ph, pw = 224 - nh, 224 - nw
    padded = TF.pad(resized, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
    reference = TF.normalize(padded, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)[None]
    ours = clip_preprocess(frames, 224, "letterbox", clamp=False)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_letterbox_pads_black_and_squash_keeps_everything():
    wide = torch.full((1, 3, 100, 200), 0.7)
    boxed = resize_for_clip(wide, 224, "letterbox")
    assert boxed.shape == (1, 3, 224, 224)
    assert torch.all(boxed[..., :56, :] == 0) and torch.all(boxed[..., -56:, :] == 0)  # 224 - 112 = 112 rows of pad
    assert torch.allclose(boxed[..., 56:-56, :], torch.tensor(0.7), atol=1e-5)
    squashed = resize_for_clip(wide, 224, "squash")
    assert torch.allclose(squashed, torch.tensor(0.7), atol=1e-5)
    with pytest.raises(ValueError, match="unknown resize mode"):
        resize_for_clip(wide, 224, "stretch")


# ----------------------------------------------------------------------------- HPS


def test_hps_matches_open_clip_forward(hps_reward, files, frames):
    import open_clip

    reference = tiny_clip.tiny_open_clip_model(seed=3)  # same weights, built independently of the loader
    pixels = hps_reward.pixel_values(frames)
    text = open_clip.get_tokenizer("ViT-H-14")(PROMPTS)
    with torch.no_grad():
        image_features, text_features, _ = reference(pixels, text)  # open_clip normalises both
        expected = torch.diagonal(image_features @ text_features.T)
        ours = hps_reward(frames, PROMPTS)
    assert ours.dtype == torch.float32 and ours.shape == (2,)
    assert torch.allclose(ours, expected, atol=1e-5), (ours, expected)
    assert not torch.allclose(ours[0], ours[1])  # the inputs really differ


def test_hps_loads_bare_state_dict_and_versions(files, frames, hps_reward, tmp_path):
    state = tiny_clip.tiny_open_clip_model(seed=3).state_dict()
    torch.save(state, tmp_path / "HPS_v2_compressed.pt")  # bare state dict, no "module." prefix
    reward = hps.load_hps(tmp_path, version="v2.0", model_name=files["hps_config"], preprocess_mode="squash")
    assert reward.name == "hps_v2"
    reward.preprocess_mode = "letterbox"
    with torch.no_grad():
        assert torch.allclose(reward(frames, PROMPTS), hps_reward(frames, PROMPTS), atol=1e-6)


def test_hps_gradients_reach_frames_only(hps_reward, frames):
    x = frames.clone().requires_grad_(True)
    hps_reward(x, PROMPTS).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in hps_reward.parameters())


def test_hps_bf16_close_to_fp32(files, hps_reward, frames):
    reward = hps.load_hps(files["hps"], "v2.1", model_name=files["hps_config"], dtype=torch.bfloat16)
    assert next(reward.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        low, full = reward(frames, PROMPTS), hps_reward(frames, PROMPTS)
    assert low.dtype == torch.float32
    # measured max |bf16 - fp32| = 0.0031 on cosines of -0.17 and 0.03 (they differ by 0.2)
    assert torch.allclose(low, full, atol=0.006), (low, full)


# ----------------------------------------------------------------------------- distinct prompts

PROMPT_ROWS = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[0]]


def _count_text_rows(embedding: torch.nn.Module) -> tuple[list[int], object]:
    """Rows (prompts) each text-tower call embeds, recorded at its token embedding."""
    rows: list[int] = []
    handle = embedding.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    return rows, handle


def check_one_text_row_per_prompt(reward, token_embedding, four, before):
    """Scoring four frames against PROMPT_ROWS (two distinct prompts) runs the text tower on two rows
    and gives the scores of encoding every row."""
    rows, handle = _count_text_rows(token_embedding)
    try:
        with torch.no_grad():
            ours = reward(four, PROMPT_ROWS)
    finally:
        handle.remove()
    assert rows == [2]
    assert torch.allclose(ours, before, atol=1e-6, rtol=0), (ours, before)


def test_hps_encodes_each_distinct_prompt_once(hps_reward, frames):
    four = torch.cat([frames, frames.flip(0)])
    model = hps_reward.model
    with torch.no_grad():  # the text tower on all four rows, as before deduplication
        every_row = model.encode_text(open_clip_tokenizer()(PROMPT_ROWS), normalize=True)
        before = (hps_reward.image_embeddings(four) * every_row).sum(-1)
    check_one_text_row_per_prompt(hps_reward, model.token_embedding, four, before)


def test_pickscore_encodes_each_distinct_prompt_once(pick_reward, frames):
    four = torch.cat([frames, frames.flip(0)])
    model = pick_reward.model
    with torch.no_grad():
        pixels = pick_reward.pixel_values(four)
        image = pickscore.clip_image_embeddings(model, pixels)
        text = pickscore.clip_text_embeddings(model, open_clip_tokenizer()(PROMPT_ROWS))
        before = model.logit_scale.exp() * F.cosine_similarity(image, text, dim=-1)
    check_one_text_row_per_prompt(pick_reward, model.text_model.embeddings.token_embedding, four, before)


def _mps_score_every_row(reward: mps.MPSReward, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """MPS as computed before deduplication: every row and the condition through the text tower."""
    clip = reward.mps.model
    prompt_tokens, prompt_eos = reward._text_tokens(prompts)
    condition = reward._text_tokens([reward.condition])[0].expand(len(prompts), -1, -1)
    bias = mps.condition_bias(prompt_tokens, condition)
    image_tokens = clip.visual_projection(clip.vision_model(pixel_values=reward.pixel_values(frames)).last_hidden_state)
    judged = reward.mps.cross_model(image_tokens, prompt_tokens, bias)[:, 0]
    return clip.logit_scale.exp() * F.cosine_similarity(judged, prompt_eos, dim=-1)


def test_mps_encodes_each_distinct_prompt_once_and_caches_condition(mps_reward, frames):
    reward = mps.MPSReward(mps_reward.mps, mps_reward.tokenizer)  # shares the weights, empty cache
    four = torch.cat([frames, frames.flip(0)])
    with torch.no_grad():
        before = _mps_score_every_row(reward, four, PROMPT_ROWS)
    rows, handle = _count_text_rows(reward.mps.model.text_model.embeddings.token_embedding)
    try:
        with torch.no_grad():
            first = reward(four, PROMPT_ROWS)
            second = reward(four, PROMPT_ROWS)
            reward.condition = "light, color"  # a new phrase is encoded, not served from the cache
            reward(four, PROMPT_ROWS)
    finally:
        handle.remove()
    assert rows == [1, 2, 2, 1, 2]  # condition + 2 distinct prompts; then prompts only
    assert torch.allclose(first, before, atol=1e-6, rtol=0), (first, before)
    assert torch.equal(first, second)


# ----------------------------------------------------------------------------- PickScore


def test_pickscore_matches_clipmodel_forward(pick_reward, files, frames):
    from transformers import CLIPModel

    reference = CLIPModel.from_pretrained(files["pickscore"], local_files_only=True).eval()
    pixels = pick_reward.pixel_values(frames)
    input_ids = open_clip_tokenizer()(PROMPTS)
    with torch.no_grad():
        expected = torch.diagonal(reference(input_ids=input_ids, pixel_values=pixels).logits_per_image)
        ours = pick_reward(frames, PROMPTS)
    assert torch.allclose(ours, expected, atol=1e-4), (ours, expected)
    assert not torch.allclose(ours[0], ours[1])
    assert "open_clip" in pick_reward.tokenizer.source  # the tiny folder ships no tokenizer files


def test_folder_tokenizer_files_match_open_clip_ids(files, pick_reward, frames, tmp_path):
    """A folder's own tokenizer files (transformers CLIPTokenizer) give the open_clip ids, and
    PickScore picks them up; unicode, punctuation and truncation past 77 tokens included."""
    import shutil

    folder = tmp_path / "pickscore_with_tokenizer"
    shutil.copytree(files["pickscore"], folder)
    write_clip_tokenizer_files(folder)
    prompts = ["a red fox, jumping over a frozen river.", "Ramen  ÉCLAIR & café 東京 " + "word " * 100, ""]
    hf_ids = tokenizer_for_folder(folder)(prompts)
    assert "tokenizer files" in tokenizer_for_folder(folder).source
    assert torch.equal(hf_ids, open_clip_tokenizer()(prompts))
    assert hf_ids[1, -1] == 49407 and hf_ids[2, 1] == 49407
    reward = pickscore.load_pickscore(folder)
    assert "tokenizer files" in reward.tokenizer.source
    with torch.no_grad():
        assert torch.allclose(reward(frames, PROMPTS), pick_reward(frames, PROMPTS), atol=1e-6)


def check_gradients_and_batch_independence(reward, frames):
    """Gradients reach the frames (never the frozen weights), and a batch scores as its items alone."""
    x = frames.clone().requires_grad_(True)
    scores = reward(x, PROMPTS)
    scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.parameters())
    with torch.no_grad():
        single = torch.cat([reward(frames[i : i + 1], [PROMPTS[i]]) for i in range(2)])
    assert torch.allclose(scores.detach(), single, atol=1e-5)


def test_pickscore_gradients_and_batch_independence(pick_reward, frames):
    check_gradients_and_batch_independence(pick_reward, frames)


def test_pickscore_bf16_loader(files, pick_reward, frames):
    reward = pickscore.load_pickscore(files["pickscore"], device="cpu", dtype=torch.bfloat16)
    assert next(reward.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        low, full = reward(frames, PROMPTS), pick_reward(frames, PROMPTS)
    assert low.dtype == torch.float32
    # measured max |bf16 - fp32| = 0.033 on scores of -0.86 and 4.0
    assert torch.allclose(low, full, atol=0.08)


# ----------------------------------------------------------------------------- MPS


def _reference_mps_score(clip, cross_state: dict, cfg: dict, pixels, prompt: str, condition: str, keep: float) -> torch.Tensor:
    """MPS's formula written out directly for ONE (image, prompt) pair, from the raw cross-model weights."""
    tok = open_clip_tokenizer()
    text_out = clip.text_model(input_ids=tok([prompt]))
    text_f = clip.text_projection(text_out[0])  # (1, 77, P) all tokens
    text_eos = clip.text_projection(text_out[1])  # (1, P)
    cond_f = clip.text_projection(clip.text_model(input_ids=tok([condition]))[0])
    sim = torch.einsum("bid,bjd->bji", text_f, cond_f).max(dim=1, keepdim=True)[0]
    sim = sim / sim.max()
    mask = torch.where(sim > keep, 0.0, float("-inf"))  # (1, 1, 77); MPS uses keep = 0.01
    masked_tokens.append(int(torch.isinf(mask).sum()))
    x = clip.visual_projection(clip.vision_model(pixel_values=pixels)[0])  # (1, 257, P) before post-LN

    heads, d, ff_mult, dim = cfg["heads"], cfg["dim_head"], cfg["ff_mult"], cfg["dim"]

    def ln(t, w):
        return F.layer_norm(t, (t.shape[-1],), w, None)

    def swiglu(h):
        a, g = h.chunk(2, dim=-1)
        return a * F.silu(g)

    def rope(t):
        n, half = t.shape[-2], t.shape[-1] // 2
        inv = 1.0 / 10000 ** (torch.arange(half).float() * 2 / t.shape[-1])
        ang = torch.arange(n).float()[:, None] * inv[None, :]
        t1, t2 = t[..., :half], t[..., half:]
        return torch.cat([t1 * ang.cos() - t2 * ang.sin(), t2 * ang.cos() + t1 * ang.sin()], dim=-1)

    def w(name):
        return cross_state[name]

    for i in range(cfg["layers"]):
        c = f"layers.{i}.0.fn."
        xn = ln(x, w(c + "norm.weight"))
        q = (xn @ w(c + "to_q.weight").T).unflatten(-1, (heads, d)).transpose(1, 2)
        k, v = (text_f @ w(c + "to_kv.weight").T).chunk(2, dim=-1)
        k, v = k[:, None].expand(-1, heads, -1, -1), v[:, None].expand(-1, heads, -1, -1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        att = att.transpose(1, 2).flatten(2) @ w(c + "to_out.weight").T
        x = x + att + swiglu(xn @ w(c + "ff.0.weight").T) @ w(c + "ff.2.weight").T

        s = f"layers.{i}.1.fn."
        xn = ln(x, w(s + "norm.weight"))
        q, k, v, ff = (xn @ w(s + "fused_attn_ff_proj.weight").T).split([heads * d, d, d, 2 * ff_mult * dim], dim=-1)
        q = rope(q.unflatten(-1, (heads, d)).transpose(1, 2))
        k = rope(k)[:, None].expand(-1, heads, -1, -1)
        v = v[:, None].expand(-1, heads, -1, -1)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2) @ w(s + "attn_out.weight").T
        x = x + att + swiglu(ff) @ w(s + "ff_out.1.weight").T

    judged = x[:, 0]
    return clip.logit_scale.exp() * (F.normalize(text_eos, dim=-1) * F.normalize(judged, dim=-1)).sum(-1)


masked_tokens: list[int] = []


# 0.01 is MPS's threshold (with tiny random weights it keeps every token); 0.6 makes the mask bite.
@pytest.mark.parametrize("keep", [0.01, 0.6])
def test_mps_matches_direct_formula(mps_reward, files, frames, keep, monkeypatch):
    monkeypatch.setattr(mps, "CONDITION_KEEP_THRESHOLD", keep)
    masked_tokens.clear()
    state = torch.load(files["mps"], weights_only=True)
    reference = tiny_clip.tiny_mps_model(seed=5)
    reference.load_state_dict(state)
    cross_state = {k[len("cross_model.") :]: v for k, v in state.items() if k.startswith("cross_model.")}
    pixels = mps_reward.pixel_values(frames)
    with torch.no_grad():
        expected = torch.cat(
            [
                _reference_mps_score(reference.model, cross_state, tiny_clip.TINY_CROSS_MODEL_CONFIG, pixels[i : i + 1], PROMPTS[i], mps.MPS_OVERALL_CONDITION, keep)
                for i in range(2)
            ]
        )
        ours = mps_reward(frames, PROMPTS)
    assert torch.allclose(ours, expected, atol=1e-4), (ours, expected)
    assert not torch.allclose(ours[0], ours[1])
    if keep > 0.5:
        assert all(0 < m < 77 for m in masked_tokens), masked_tokens  # some tokens masked, some kept
    # cosine-only variant (EasyAnimate's trainer) is the same score without the logit scale
    plain = mps.MPSReward(mps_reward.mps, mps_reward.tokenizer, use_logit_scale=False)
    with torch.no_grad():
        scale = mps_reward.mps.model.logit_scale.exp()
        assert torch.allclose(plain(frames, PROMPTS) * scale, ours, atol=1e-4)


def test_mps_gradients_and_batch_independence(mps_reward, frames):
    check_gradients_and_batch_independence(mps_reward, frames)


def test_mps_cross_config_read_from_checkpoint(mps_reward):
    assert mps_reward.mps.cross_model.config == tiny_clip.TINY_CROSS_MODEL_CONFIG


def test_mps_bf16_close_to_fp32(files, mps_reward, frames):
    reward = mps.load_mps(files["mps"], clip_config=tiny_clip.TINY_HF_CLIP_CONFIG, dtype=torch.bfloat16)
    assert next(reward.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        low, full = reward(frames, PROMPTS), mps_reward(frames, PROMPTS)
    assert low.dtype == torch.float32
    # measured max |bf16 - fp32| = 0.041 on scores of 1.23 and -0.0006
    assert torch.allclose(low, full, atol=0.08), (low, full)


def test_rotary_angles_stay_float32_under_bf16():
    """A bf16 copy of the frequencies would be off by up to 2^-9 relative: ~0.5 rad at position 256."""
    rotary = mps.RotaryEmbedding(64).to(torch.bfloat16)
    assert list(rotary.state_dict()) == []  # nothing for .to() to round
    angles = rotary.angles(257, torch.device("cpu"))
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    expected = torch.arange(257, dtype=torch.float64)[:, None] * inv_freq[None, :]
    assert angles.dtype == torch.float32
    assert torch.allclose(angles.double(), torch.cat([expected, expected], dim=-1), atol=1e-4, rtol=0)


def test_mps_checkpoint_with_inv_freq_keys_loads(files, mps_reward, frames, tmp_path):
    # Checkpoints saved from the original code carry the rotary frequencies as buffers.
    state = torch.load(files["mps"], weights_only=True)
    cfg = tiny_clip.TINY_CROSS_MODEL_CONFIG
    inv_freq = 1.0 / 10000 ** (torch.arange(0, cfg["dim_head"], 2).float() / cfg["dim_head"])
    for layer in range(cfg["layers"]):
        state[f"cross_model.layers.{layer}.1.fn.rotary_emb.inv_freq"] = inv_freq.clone()
    torch.save(state, tmp_path / "MPS_overall.pth")
    reward = mps.load_mps(tmp_path, clip_config=tiny_clip.TINY_HF_CLIP_CONFIG)
    with torch.no_grad():
        assert torch.allclose(reward(frames, PROMPTS), mps_reward(frames, PROMPTS), atol=1e-6)


def test_mps_converter_plain_and_pickled(files, mps_reward, frames, tmp_path):
    # EasyAnimate-style plain state dict -> safetensors, no flag needed; same scores.
    converted = convert_mps_checkpoint(str(files["mps"]), str(tmp_path / "MPS_overall.safetensors"))
    reward = mps.load_mps(converted, clip_config=tiny_clip.TINY_HF_CLIP_CONFIG)
    with torch.no_grad():
        assert torch.allclose(reward(frames, PROMPTS), mps_reward(frames, PROMPTS), atol=1e-6)
    # The original release pickles the whole module: refused by default, by the loader and the tool.
    pickled = tmp_path / "MPS_overall_checkpoint.pth"
    torch.save(tiny_clip.tiny_mps_model(seed=5), pickled)
    with pytest.raises(ValueError, match="trust-pickle"):
        convert_mps_checkpoint(str(pickled), str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="convert_mps_checkpoint"):
        mps.load_mps(pickled, clip_config=tiny_clip.TINY_HF_CLIP_CONFIG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = convert_mps_checkpoint(str(pickled), str(tmp_path / "from_pickle.safetensors"), trust_pickle=True)
    assert any("trust-pickle" in str(w.message) for w in caught)
    reward = mps.load_mps(out, clip_config=tiny_clip.TINY_HF_CLIP_CONFIG)
    with torch.no_grad():
        assert torch.allclose(reward(frames, PROMPTS), mps_reward(frames, PROMPTS), atol=1e-6)


def test_mps_rejects_wrong_architecture(files, tmp_path):
    state = torch.load(files["mps"], weights_only=True)
    state["cross_model.layers.0.0.fn.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "MPS_overall.pth")
    with pytest.raises(ValueError, match="unexpected"):
        mps.load_mps(tmp_path, clip_config=tiny_clip.TINY_HF_CLIP_CONFIG)


# ----------------------------------------------------------------------------- missing files


def test_missing_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"HPS_v2\.1_compressed\.pt"):
        hps.load_hps(tmp_path, "v2.1")
    with pytest.raises(FileNotFoundError, match=r"HPS_v2_compressed\.pt"):
        hps.load_hps(tmp_path / "nope.pt", "v2")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        pickscore.load_pickscore(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        pickscore.load_pickscore(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"PickScore folder not found: .*missing_folder"):
        pickscore.load_pickscore(tmp_path / "missing_folder")
    with pytest.raises(FileNotFoundError, match=r"MPS_overall\.pth"):
        mps.load_mps(tmp_path)
    with pytest.raises(FileNotFoundError, match=os.path.basename("gone.pth")):
        mps.load_mps(tmp_path / "gone.pth")
