"""Motion-aware rewards: optical flow (weight-free coarse-to-fine, torchvision RAFT), `motion` and
flow-warped `temporal_consistency`, ranked on synthetic videos with known motion."""

import math

import pytest
import torch

from easyanimate_reward.reward.flow import PyramidFlow, flow_error, load_raft, warp
from easyanimate_reward.reward.registry import load_reward
from easyanimate_reward.reward.scoring import score_images
from easyanimate_reward.reward.synthetic import flicker_video, moving_video, pan_video
from easyanimate_reward.reward.video import FlowConsistencyReward, MotionReward, score_per_video


def video_score(reward, video):
    scores = reward(video)
    assert scores.shape == (video.shape[0],)
    assert torch.equal(scores, scores[:1].expand_as(scores))  # every frame carries its video's score
    return scores[0].item()


def test_motion_ranks_static_below_pan_below_fast_pan():
    motion = load_reward("motion")
    static, pan, fast = (video_score(motion, pan_video(dx, dx / 2)) for dx in (0.0, 1.0, 4.0))
    assert static == 0.0
    assert static < pan < fast
    # In pixels per frame: the pans move by |(1, 0.5)| = 1.12 and |(4, 2)| = 4.47 (measured 1.10 / 4.35).
    assert pan == pytest.approx(math.hypot(1.0, 0.5), rel=0.05)
    assert fast == pytest.approx(math.hypot(4.0, 2.0), rel=0.05)


def test_estimated_flow_is_close_to_the_known_flow():
    estimator = PyramidFlow()
    pan = pan_video(2.0, -1.0, frames=2)
    flow = estimator(pan[:1], pan[1:])
    known = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1).expand_as(flow)
    assert flow_error(flow, known, margin=14) < 0.05  # measured 0.017 px away from the borders
    assert flow_error(flow, known, margin=4) < 0.1  # measured 0.067 px (uncovered border pixels)

    # A rotation + translation field: not a single shift.
    centre, angle = 32.0, 0.03

    def field(x, y, t):
        return (-(y - centre) * angle * t + 1.5 * t, (x - centre) * angle * t)

    video = moving_video(field, frames=2)
    flow = estimator(video[:1], video[1:])
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    known = torch.stack(field(xs, ys, 1)).unsqueeze(0)
    assert flow_error(flow, known, margin=6) < 0.15  # measured 0.086 px on a 1.6 px mean flow
    # Warping the second frame by the estimate reconstructs the first one.
    reconstructed = warp(video[1:], flow)
    assert (reconstructed - video[:1])[..., 6:-6, 6:-6].abs().mean() < 0.01


def test_temporal_consistency_prefers_a_smooth_pan_over_flicker():
    consistency = load_reward("temporal_consistency")
    static = video_score(consistency, pan_video(0.0))
    pan = video_score(consistency, pan_video(2.0))
    flicker = video_score(consistency, flicker_video(0.3))
    assert static == 0.0
    assert flicker < pan <= 0.0
    assert pan > -0.01 and flicker < -0.05  # measured about -0.002 and -0.07
    # The plain frame difference counts the pan as inconsistent (about -0.07), flow-warped it is not.
    assert load_reward("frame_difference")(pan_video(2.0)).mean() < 10 * pan


def test_flicker_is_not_read_as_motion():
    motion = load_reward("motion")
    assert video_score(motion, flicker_video(0.3)) < 0.1 * video_score(motion, pan_video(1.0))


@pytest.mark.parametrize("kind", ["motion", "temporal_consistency"])
def test_time_aware_rewards_never_look_across_videos(kind):
    first, second = pan_video(0.0, seed=1), pan_video(0.0, seed=2)  # two different still videos
    both = torch.cat([first, second])
    per_video = load_reward(kind, frames_per_video=5)(both)
    assert per_video.tolist() == [0.0] * 10
    # As one video the cut between them would count: the split is what keeps them apart.
    assert load_reward(kind)(both).abs().sum() > 0
    # Callers that know the video length hand over one video at a time.
    assert score_per_video(load_reward(kind), both, [""] * 10, 5).tolist() == [0.0] * 10
    images = both.permute(0, 2, 3, 1)
    assert score_images(load_reward(kind), images, "", batch_size=2, frames_per_video=5).tolist() == [0.0] * 10


def test_one_frame_video_scores_zero_and_stays_differentiable():
    frame = torch.rand(1, 3, 16, 16, requires_grad=True)
    for reward in (MotionReward(), FlowConsistencyReward()):
        score = reward(frame)
        assert score.tolist() == [0.0]
        score.sum().backward()


def test_gradients_reach_the_frames():
    video = pan_video(1.5, 0.5).requires_grad_(True)
    MotionReward()(video).sum().backward()
    motion_grad = video.grad.clone()
    assert torch.isfinite(motion_grad).all() and motion_grad.abs().sum() > 0
    video.grad = None
    flicker = flicker_video(0.3).requires_grad_(True)
    FlowConsistencyReward()(flicker).sum().backward()
    assert torch.isfinite(flicker.grad).all() and flicker.grad.abs().sum() > 0
    # Raising consistency along its gradient dims the flicker: the bright frames get darker or
    # the dark ones brighter, i.e. the frames move towards each other.
    step = FlowConsistencyReward()(flicker.detach() + 0.5 * flicker.grad).mean()
    assert step > FlowConsistencyReward()(flicker.detach()).mean()


def _random_raft_file(path, variant="raft_small"):
    from easyanimate_reward.reward.flow import build_raft

    torch.manual_seed(0)
    model = build_raft(variant)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def test_raft_loads_with_weights_only_and_gives_shapes_and_gradients(tmp_path):
    # Random weights say nothing about flow quality (about 4 px on identical frames): only
    # loading, shapes and gradients are checked here.
    folder = tmp_path / "reward_models"
    _random_raft_file(folder / "raft" / "raft_small.pth")
    motion = load_reward("motion_raft_small", folder, num_flow_updates=2)
    consistency = load_reward("temporal_consistency_raft_small", folder, num_flow_updates=2)
    video = pan_video(1.0, size=40, frames=3).requires_grad_(True)  # below 128 px: upsampled inside
    seen = []
    hook = motion.estimator.model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    flow = motion.estimator(video[:2], video[1:])
    hook.remove()
    assert seen == [(2, 3, 128, 128)]  # RAFT itself ran at 128 px (sides a multiple of 8)
    assert flow.shape == (2, 2, 40, 40)
    scores = motion(video)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert video.grad is not None and torch.isfinite(video.grad).all() and video.grad.abs().sum() > 0
    assert consistency(video.detach()).shape == (3,)
    assert not any(p.requires_grad for p in motion.parameters())


def test_raft_file_problems_are_clear(tmp_path):
    folder = tmp_path / "reward_models"
    with pytest.raises(FileNotFoundError, match=r"raft/raft_small\.pth"):
        load_reward("motion_raft_small", folder)
    _random_raft_file(folder / "raft" / "raft_large.pth", "raft_small")  # small weights under the large name
    with pytest.raises(ValueError, match="holds raft_small weights, not raft_large"):
        load_reward("motion_raft_large", folder)
    bad = folder / "raft" / "raft_small.pth"
    torch.save({"x": object()}, bad)  # a pickled object: weights_only refuses it
    with pytest.raises(ValueError, match="cannot read RAFT weights"):
        load_raft(bad, "raft_small")
