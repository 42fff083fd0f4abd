"""load_reward over a complete tiny reward_models folder, missing-file errors, combination formulas,
batched scoring / ranking (the core of the reward nodes) and the PIL plot."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from easyanimate_reward.reward.base import Reward, WeightedReward
from easyanimate_reward.reward.plot import PALETTE, plot_series
from easyanimate_reward.reward.registry import (
    OPTIONS_FILE,
    REWARD_KINDS,
    expected_files,
    needs_files,
    expected_files_markdown,
    load_reward,
    parse_combination,
    parse_combination_terms,
    resolve_dtype,
    write_tiny_reward_models,
)
from easyanimate_reward.reward.scoring import rank_videos, score_images, select_videos
from easyanimate_reward.reward.simple import ColorfulnessReward, ContrastReward, TemporalConsistencyReward
from easyanimate_reward.tools.convert_mps_checkpoint import convert_mps_checkpoint

ALL_KINDS = (
    "hps_v2", "hps_v2.1", "pickscore", "mps", "aesthetic_v2", "aesthetic_v2.5",
    "colorfulness", "saturation", "contrast", "sharpness", "compressibility", "frame_difference", "motion",
    "temporal_consistency", "motion_raft_small", "motion_raft_large", "temporal_consistency_raft_small",
    "temporal_consistency_raft_large",
)
RAFT_KINDS = ["motion_raft_small", "motion_raft_large", "temporal_consistency_raft_small",
              "temporal_consistency_raft_large"]
FILE_KINDS = [k for k in ALL_KINDS if any(f.required for f in expected_files(k)) and k not in RAFT_KINDS]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_reward_models(tmp_path_factory.mktemp("reward_models"))


def test_every_kind_is_registered():
    assert set(REWARD_KINDS) == set(ALL_KINDS)
    assert FILE_KINDS == ["hps_v2", "hps_v2.1", "pickscore", "mps", "aesthetic_v2", "aesthetic_v2.5"]
    assert all(needs_files(k) for k in RAFT_KINDS)  # RAFT weights: tests/test_motion_rewards.py
    table = expected_files_markdown()
    for kind in ALL_KINDS:
        assert f"`{kind}`" in table
        for f in expected_files(kind):
            assert f.path in table


def test_expected_file_names():
    names = {k: [f.path for f in expected_files(k) if f.required] for k in FILE_KINDS}
    assert names == {
        "hps_v2": ["HPS_v2_compressed.pt"],
        "hps_v2.1": ["HPS_v2.1_compressed.pt"],
        "pickscore": ["PickScore_v1"],
        "mps": ["MPS_overall.pth"],
        "aesthetic_v2": ["aesthetic/sac+logos+ava1-l14-linearMSE.pth", "aesthetic/clip-vit-large-patch14"],
        "aesthetic_v2.5": ["aesthetic/aesthetic_predictor_v2_5.pth", "aesthetic/siglip-so400m-patch14-384"],
    }


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_missing_files_name_exact_paths_and_sources(kind, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_reward(kind, tmp_path)
    message = str(error.value)
    for f in expected_files(kind):
        if f.required:
            assert str(tmp_path / f.path) in message
            assert ("https://" in f.source or "github.com" in f.source) and f.source in message
    with pytest.raises(FileNotFoundError, match="reward_models"):
        load_reward(kind, None)


def test_partly_present_files(tiny_folder, tmp_path):
    # head present, backbone folder missing -> only the backbone is named
    (tmp_path / "aesthetic").mkdir()
    shutil.copy(tiny_folder / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth", tmp_path / "aesthetic")
    with pytest.raises(FileNotFoundError) as error:
        load_reward("aesthetic_v2", tmp_path)
    assert "clip-vit-large-patch14" in str(error.value) and "linearMSE" not in str(error.value)
    # a model folder with a config but no weights counts as missing
    (tmp_path / "aesthetic" / "clip-vit-large-patch14").mkdir()
    shutil.copy(tiny_folder / "aesthetic" / "clip-vit-large-patch14" / "config.json", tmp_path / "aesthetic" / "clip-vit-large-patch14")
    with pytest.raises(FileNotFoundError, match="config.json \\+ weights"):
        load_reward("aesthetic_v2", tmp_path)


def test_converted_mps_safetensors_loads_and_is_preferred(tiny_folder, tmp_path):
    frames = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    prompts = ["a red fox in the snow", "a blue car"]
    shutil.copy(tiny_folder / OPTIONS_FILE, tmp_path)
    convert_mps_checkpoint(str(tiny_folder / "MPS_overall.pth"), str(tmp_path / "MPS_overall.safetensors"))
    with torch.no_grad():
        original = load_reward("mps", tiny_folder)(frames, prompts)
        converted = load_reward("mps", tmp_path)(frames, prompts)  # only the .safetensors is there
        assert torch.allclose(converted, original, atol=1e-6)
        # with both present the converted file wins (a .pth of other weights is ignored)
        other = torch.load(tiny_folder / "MPS_overall.pth", weights_only=True)
        other = {k: (v.flip(0) if k.startswith("cross_model.") else v) for k, v in other.items()}
        torch.save(other, tmp_path / "MPS_overall.pth")
        assert torch.allclose(load_reward("mps", tmp_path)(frames, prompts), original, atol=1e-6)
        (tmp_path / "MPS_overall.safetensors").unlink()
        assert not torch.allclose(load_reward("mps", tmp_path)(frames, prompts), original, atol=1e-3)
    assert "`MPS_overall.pth` or `MPS_overall.safetensors`" in expected_files_markdown()


def test_resolve_dtype_names_and_auto():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32  # CPUs: float32
    assert resolve_dtype("bfloat16") == resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16 and resolve_dtype(None) == torch.float32
    assert resolve_dtype(torch.float64) == torch.float64
    with pytest.raises(ValueError, match="unknown dtype 'half8'"):
        resolve_dtype("half8")
    assert next(load_reward("contrast", None, "cpu", "auto").parameters(), None) is None  # weight-free loads


class _ConstantReward(Reward):
    """Scores on a fixed device whatever the frames' device, as a model living elsewhere does."""

    def __init__(self, device: str, value: float):
        super().__init__()
        self.device, self.value = device, value

    def score(self, frames, prompts):
        return torch.full((frames.shape[0],), self.value, device=self.device, dtype=torch.bfloat16)


def test_scores_come_back_on_the_frames_device():
    frames = torch.empty(3, 3, 8, 8, device="meta")
    combined = WeightedReward([(_ConstantReward("cpu", 1.0), 1.0), (ContrastReward(), 2.0)])
    total = combined(frames)  # cpu + meta terms: adding them fails unless each comes back on meta
    assert total.device.type == "meta" and total.shape == (3,) and total.dtype == torch.float32
    cpu_frames = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    both = WeightedReward([(_ConstantReward("cpu", 1.5), 2.0), (_ConstantReward("meta", 1.0), 0.0)])
    with pytest.raises(NotImplementedError):  # meta -> cpu has no data: proves the move really happens
        both(cpu_frames)
    assert torch.equal(WeightedReward([(_ConstantReward("cpu", 1.5), 2.0)])(cpu_frames), torch.full((3,), 3.0))


def test_bad_kind_and_options(tiny_folder):
    with pytest.raises(ValueError, match="unknown reward kind"):
        load_reward("imagereward", tiny_folder)
    with pytest.raises(TypeError, match="does not take options"):
        load_reward("contrast", None, bogus=1)


def test_every_kind_loads_scores_and_backpropagates(tiny_folder):
    frames = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    for kind in [k for k in ALL_KINDS if k not in RAFT_KINDS]:  # RAFT: tests/test_motion_rewards.py
        reward = load_reward(kind, tiny_folder, "cpu", "float32")
        assert isinstance(reward, Reward)
        assert all(not p.requires_grad for p in reward.parameters())
        x = frames.clone().requires_grad_(True)
        scores = reward(x, ["a red fox in the snow", "a blue car"])
        assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all(), kind
        scores.sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, kind


def test_folder_options_and_caller_options(tiny_folder):
    table = json.loads((tiny_folder / OPTIONS_FILE).read_text())
    assert set(table) == {"hps_v2", "hps_v2.1", "mps"}  # only the tiny architectures need telling
    reward = load_reward("hps_v2.1", tiny_folder, preprocess_mode="squash")
    assert reward.preprocess_mode == "squash"
    temporal = load_reward("frame_difference", None, frames_per_video=2, metric="l2")
    assert temporal.frames_per_video == 2 and temporal.metric == "l2"
    warped = load_reward("temporal_consistency", None, frames_per_video=3, max_size=64, detach_flow=False)
    assert (warped.frames_per_video, warped.estimator.max_size, warped.detach_flow) == (3, 64, False)


def test_parse_combination_terms():
    assert parse_combination_terms("hps_v2.1 + 0.5*aesthetic_v2.5 - temporal_consistency") == [
        ("hps_v2.1", 1.0), ("aesthetic_v2.5", 0.5), ("temporal_consistency", -1.0)
    ]
    assert parse_combination_terms("-2 sharpness + contrast*3 + 1e-2 * x") == [
        ("sharpness", -2.0), ("contrast", 3.0), ("x", 0.01)
    ]
    for bad in ("", "hps aesthetic", "0.5*", "hps + + x", "hps; rm -rf"):
        with pytest.raises(ValueError):
            parse_combination_terms(bad)


def test_parse_combination_numbers():
    frames = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    rewards = {"colour": ColorfulnessReward(), "contrast": ContrastReward()}
    combined = parse_combination("0.01*colour - 2 * contrast", rewards)
    assert isinstance(combined, WeightedReward)
    expected = 0.01 * rewards["colour"](frames) - 2 * rewards["contrast"](frames)
    assert torch.allclose(combined(frames), expected)
    with pytest.raises(KeyError, match="available: colour, contrast"):
        parse_combination("colour + hps", rewards)


def test_batched_scoring_equals_one_shot():
    images = torch.rand(7, 16, 20, 3, generator=torch.Generator().manual_seed(2))  # IMAGE layout
    reward = WeightedReward([(ContrastReward(), 1.0), (ColorfulnessReward(), 0.01)])
    calls = []
    batched = score_images(reward, images, "p", batch_size=3, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(3, 7), (6, 7), (7, 7)]
    assert torch.allclose(batched, reward(images.permute(0, 3, 1, 2)))
    # a frame-comparing reward is never split: batch_size must not change temporal scores
    temporal = WeightedReward([(TemporalConsistencyReward(), 1.0), (ContrastReward(), 1.0)])
    whole = temporal(images.permute(0, 3, 1, 2))
    assert torch.allclose(score_images(temporal, images, "p", batch_size=2), whole)


def test_rank_and_select_videos():
    # 3 candidates x 2 frames; candidate 1 is the most colourful, candidate 0 grey
    images = torch.full((6, 8, 8, 3), 0.5)
    images[2:4, ..., 0] = 1.0
    images[4:6, ..., 2] = 0.8
    ranked = rank_videos(ColorfulnessReward(), images, 2, "p", batch_size=4)
    assert [v.index for v in ranked] == [1, 2, 0]
    assert ranked[0].score == pytest.approx(sum(ranked[0].frame_scores) / 2)
    best = select_videos(images, 2, [v.index for v in ranked[:2]])
    assert torch.equal(best, torch.cat([images[2:4], images[4:6]]))
    with pytest.raises(ValueError, match="candidates x frames_per_video"):
        rank_videos(ColorfulnessReward(), images, 4, "p")


class _PerVideoReward(Reward):
    """Score = the frame's first pixel value (NaN allowed): lets a test set each video's score."""

    def score(self, frames, prompts):
        return frames[:, 0, 0, 0]


def test_rank_videos_puts_nan_last():
    values = [0.2, float("nan"), 0.9, float("nan"), 0.5]
    images = torch.tensor(values).repeat_interleave(2).view(-1, 1, 1, 1).expand(-1, 2, 2, 3).contiguous()
    ranked = rank_videos(_PerVideoReward(), images, 2, "p")
    assert [v.index for v in ranked] == [2, 4, 0, 1, 3]  # NaNs last, in candidate order


def test_plot_series_image():
    image = plot_series({"reward": [0.1, 0.4, float("nan"), 0.3, 0.8], "loss": [1.0, 0.5, 0.4, 0.2, 0.1]},
                        "training", "step", "value", width=320, height=200)
    assert image.shape == (1, 200, 320, 3) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    pixels = (image[0] * 255).round().to(torch.uint8).reshape(-1, 3)
    for colour in PALETTE[:2]:  # both lines (and their legend swatches) are drawn in their colours
        assert (pixels == torch.tensor(colour, dtype=torch.uint8)).all(dim=1).sum() > 20
    single = plot_series({"score": [5.0]}, "one frame", "frame", "score")
    assert single.shape == (1, 360, 640, 3)
