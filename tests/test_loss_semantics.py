"""The reward loss as the official trainer defines it: per-frame |r - max_reward| averaged over
frames (not |mean - max|), frames picked like torch.linspace(0, F - 1, n).long(), and an
"all decoded frames" choice (num_sampled_frames 0)."""

import pytest
import torch

from easyanimate_reward.easyanimate.loading import load_pipe
from easyanimate_reward.easyanimate.model import EasyAnimateModel
from easyanimate_reward.reward.base import Reward
from easyanimate_reward.training.config import TrainConfig
from easyanimate_reward.training.rollout import (
    ALL_FRAMES,
    PromptBank,
    RolloutSettings,
    frame_rewards,
    pick_frames,
    reward_loss,
    rollout_video,
    sampled_frame_indices,
)
from easyanimate_reward.training.trainer import RewardLoRATrainer

PROMPT = "a cat playing piano in a sunny room"


class FrameMean(Reward):
    """Mean pixel of each frame, magnified: a per-frame score that differs from frame to frame."""

    name = "frame_mean"

    def score(self, frames, prompts):
        return (frames.flatten(1).mean(dim=1) - 0.5) * 1000.0


def test_frames_are_picked_like_linspace_long():
    # Rounding would give [0, 3, 5, 8] and [0, 2, 3, 5, 6, 8]; the official floor gives these.
    assert sampled_frame_indices(9, 4) == [0, 2, 5, 8]
    assert sampled_frame_indices(9, 6) == [0, 1, 3, 4, 6, 8]
    for available in (1, 5, 9, 13, 49):
        for count in range(1, available + 1):
            expected = torch.linspace(0, available - 1, count).long().tolist()
            assert sampled_frame_indices(available, count) == expected, (available, count)
        assert sampled_frame_indices(available, ALL_FRAMES) == list(range(available))
    with pytest.raises(ValueError, match="exceeds"):
        sampled_frame_indices(5, 6)
    with pytest.raises(ValueError, match=">= 0"):
        sampled_frame_indices(5, -1)
    video = torch.arange(9, dtype=torch.float32).view(1, 1, 9, 1, 1).expand(2, 3, 9, 1, 1)
    assert pick_frames(video, 0)[:, 0, 0, 0].tolist() == list(range(9)) * 2


def test_max_reward_loss_is_the_mean_of_per_frame_distances():
    frames = torch.tensor([[0.5, 1.5, 1.0], [0.0, 2.0, 1.0]], requires_grad=True)  # (B=2, n=3)
    loss = reward_loss(frames, max_reward=1.0, scale=2.0)
    # per frame |r - 1| = [.5, .5, 0, 1, 1, 0] -> mean 0.5, x2; |mean - max| would be 0 here.
    assert loss.item() == pytest.approx(2.0 * 3.0 / 6)
    loss.backward()
    expected = torch.tensor([[-1.0, 1.0, 0.0], [-1.0, 1.0, 0.0]]) * 2.0 / 6  # d|r-1|/dr at r=1 is 0
    torch.testing.assert_close(frames.grad, expected)
    assert reward_loss(frames.detach(), None, 0.5).item() == pytest.approx(-0.5 * 6.0 / 6)


def test_all_frames_is_a_valid_setting_and_more_frames_are_refused():
    config = TrainConfig(width=32, height=32, frames=9, num_decoded_latents=2, num_sampled_frames=0)
    assert config.validate().num_sampled_frames == ALL_FRAMES
    with pytest.raises(ValueError, match="num_sampled_frames"):
        TrainConfig(width=32, height=32, frames=9, num_decoded_latents=2, num_sampled_frames=6).validate()
    with pytest.raises(ValueError, match="num_sampled_frames"):
        TrainConfig(width=32, height=32, frames=9, num_sampled_frames=-1).validate()


def test_trainer_loss_is_per_frame_on_all_decoded_frames(tiny_models):
    """The trainer's first-step loss (LoRA still equal to the base: up = 0) equals the mean over
    all 5 decoded frames of |r_frame - max_reward|, computed here from an independent rollout."""
    pipe = load_pipe(tiny_models["v5.1"], "fp32", "none")
    settings = RolloutSettings(width=32, height=32, frames=5, sampling_steps=2, guidance_scale=1.0,
                               num_decoded_latents=2, num_sampled_frames=0)
    bank = PromptBank(pipe, [PROMPT])
    with torch.no_grad():
        video = rollout_video(pipe, settings, bank.cond([PROMPT]), None, [0])
        scores = frame_rewards(FrameMean(), video, [PROMPT], 0)
    assert scores.shape == (1, 5)
    target = float(scores.mean())  # |mean - max| would be 0 here; the per-frame distances are not
    per_frame = (scores - target).abs().mean().item()
    assert per_frame > 0.01, scores
    config = TrainConfig(width=32, height=32, frames=5, sampling_steps=2, cfg=1.0, rank=4, alpha=4.0,
                         num_decoded_latents=2, num_sampled_frames=0, max_reward=target, loss_scale=1.0,
                         train_steps=1, save_every=0, seed=0, backprop="tail", backprop_k=1,
                         gradient_checkpointing=False)
    result = RewardLoRATrainer(EasyAnimateModel(pipe), FrameMean(), [PROMPT], config).train()
    assert result.state.history["loss"][0] == pytest.approx(per_frame, rel=1e-4)
