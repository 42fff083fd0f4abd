"""Issue 9 item 6: rewards that look at time (temporal consistency, motion) only ever see the
frames of ONE video inside the trainer, never the last frame of one video next to the first of
the next one. Uses only names that existed before the fix, so it runs on the original main."""

import pytest
import torch

from easyanimate_reward.easyanimate.loading import load_pipe
from easyanimate_reward.easyanimate.model import EasyAnimateModel
from easyanimate_reward.reward.base import Reward
from easyanimate_reward.reward.registry import load_reward
from easyanimate_reward.training.config import TrainConfig
from easyanimate_reward.training.rollout import video_rewards
from easyanimate_reward.training.trainer import RewardLoRATrainer


def two_static_videos(frames: int) -> torch.Tensor:
    """(2, 3, F, 16, 16): each video is one still image repeated; the two images differ."""
    generator = torch.Generator().manual_seed(0)
    stills = torch.rand(2, 3, 1, 16, 16, generator=generator)
    return stills.expand(-1, -1, frames, -1, -1).contiguous()


@pytest.mark.parametrize("sampled", [1, 3])
def test_temporal_consistency_of_two_static_videos_is_zero_in_the_trainer_scoring(sampled):
    reward = load_reward("temporal_consistency")
    scores = video_rewards(reward, two_static_videos(3), ["a", "b"], sampled)
    # Two still videos have no change in time at all: a perfect (zero) inconsistency each.
    assert scores.tolist() == [0.0, 0.0]


class SpyTimeReward(Reward):
    """A time-aware reward that records how many frames each call sees."""

    name = "spy"
    whole_video = True

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []

    def score(self, frames, prompts):
        self.calls.append(frames.shape[0])
        return frames.float().flatten(1).mean(dim=1)


def test_trainer_gives_a_time_aware_reward_one_video_per_call(tiny_models):
    pipe = load_pipe(tiny_models["v5"], "fp32", "none")
    config = TrainConfig(width=32, height=32, frames=5, sampling_steps=2, cfg=1.0, rank=2, alpha=2.0,
                         learning_rate=1e-3, save_every=0, seed=0, backprop="last", gradient_checkpointing=False,
                         batch_size=2, train_steps=1, num_decoded_latents=2, num_sampled_frames=3)
    spy = SpyTimeReward()
    RewardLoRATrainer(EasyAnimateModel(pipe), spy, ["a red ball", "a blue cube"], config).train()
    assert spy.calls, "the reward was never called"
    # 3 sampled frames per video (the trainer may only ever give a time-aware term more, never
    # the 6 frames of both videos together).
    assert set(spy.calls) == {3}, (
        f"a time-aware reward saw {spy.calls} frames per call: 3 per video expected, not both videos together")
