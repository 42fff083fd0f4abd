"""Official-compatible scoring options: PickScore / MPS without the logit scale, squash resizing, as
EasyAnimate's reward trainer computes them."""

import pytest
import torch

from easyanimate_reward.reward.preprocess import resize_for_clip
from easyanimate_reward.reward.registry import EASYANIMATE_OPTIONS, load_reward, scoring_options, write_tiny_reward_models


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_reward_models(tmp_path_factory.mktemp("reward_models"))


FRAMES = torch.rand(2, 3, 40, 64, generator=torch.Generator().manual_seed(0))  # not square: crop != squash
PROMPTS = ["a red fox in the snow", "a blue car"]


@pytest.mark.parametrize("kind", ["pickscore", "mps"])
def test_plain_cosine_is_the_scaled_score_without_the_logit_scale(folder, kind):
    scaled = load_reward(kind, folder)
    plain = load_reward(kind, folder, use_logit_scale=False)
    model = scaled.model if kind == "pickscore" else scaled.mps.model
    factor = model.logit_scale.float().exp()
    torch.testing.assert_close(plain(FRAMES, PROMPTS) * factor, scaled(FRAMES, PROMPTS), rtol=1e-5, atol=1e-6)
    assert plain.typical_range.high < 1 < scaled.typical_range.high


def test_squash_resizes_both_sides_without_cropping(folder):
    squash = load_reward("aesthetic_v2", folder, preprocess_mode="squash")
    crop = load_reward("aesthetic_v2", folder)
    assert (squash.resize_mode, crop.resize_mode) == ("squash", "crop")
    size = squash.image_size
    squashed = resize_for_clip(FRAMES, size, "squash")
    # Cropping an already square frame of the model's size changes nothing: both must agree there.
    torch.testing.assert_close(squash(FRAMES, PROMPTS), crop(squashed, PROMPTS), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(squash(FRAMES, PROMPTS), crop(FRAMES, PROMPTS))


def test_easyanimate_scoring_loads_every_kind_it_names(folder):
    assert scoring_options("pickscore") == {}
    for kind, options in EASYANIMATE_OPTIONS.items():
        assert scoring_options(kind, "easyanimate") == options
        reward = load_reward(kind, folder, **scoring_options(kind, "easyanimate"))
        for name, value in options.items():
            if name == "preprocess_mode":
                held = getattr(reward, "preprocess_mode", None) or reward.resize_mode
            else:
                held = reward.use_logit_scale
            assert held == value, (kind, name)
        assert torch.isfinite(reward(FRAMES, PROMPTS)).all()
    with pytest.raises(ValueError, match="scoring must be one of"):
        scoring_options("hps_v2", "official")
