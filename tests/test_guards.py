"""Guards against lost motion and reward hacking in the trainer (training/guards.py), and the
normalised combinations of rewards (reward/combine.py) whose statistics the trainer keeps."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from easyanimate_reward.easyanimate.loading import load_pipe
from easyanimate_reward.easyanimate.lora_format import save_lora_file, weights_from_tensors
from easyanimate_reward.easyanimate.model import EasyAnimateModel
from easyanimate_reward.reward.base import Reward
from easyanimate_reward.reward.combine import NormalizedReward, normalized_combination, updating_statistics
from easyanimate_reward.reward.ranges import TypicalRange
from easyanimate_reward.reward.registry import REWARD_KINDS, load_reward
from easyanimate_reward.reward.simple import ColorfulnessReward, ContrastReward
from easyanimate_reward.reward.synthetic import pan_video
from easyanimate_reward.training.run_layout import RunLayout
from easyanimate_reward.training.config import TrainConfig
from easyanimate_reward.training.guards import TrainingGuards, preserve_distance, video_motion
from easyanimate_reward.training.trainer import RewardLoRATrainer, history_plot


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return load_pipe(tiny_models["v5"], "fp32", "none")


def tiny_config(**overrides) -> TrainConfig:
    base = dict(width=32, height=32, frames=5, sampling_steps=2, cfg=1.0, rank=2, alpha=2.0,
                learning_rate=5e-2, weight_decay=0.0, max_grad_norm=1.0, save_every=0, seed=0, backprop="last",
                gradient_checkpointing=False, train_steps=1)
    base.update(overrides)
    return TrainConfig(**base)


# -- the preserve term -------------------------------------------------------------------------


def test_preserve_frames_distance_has_the_exact_gradient_and_none_into_the_base():
    generator = torch.Generator().manual_seed(0)
    video = torch.rand(2, 3, 5, 16, 16, generator=generator).requires_grad_(True)
    base = torch.rand(2, 3, 5, 16, 16, generator=generator).requires_grad_(True)
    distance = preserve_distance(video, base, "frames")
    assert distance.item() == pytest.approx((video - base).pow(2).mean().item(), rel=1e-6)
    distance.backward()
    assert torch.allclose(video.grad, 2 * (video - base).detach() / video.numel(), rtol=1e-5, atol=1e-12)
    assert base.grad is None  # the base rollout is a constant target


def test_preserve_motion_distance_gradient():
    # (At exactly zero motion the magnitude's gradient vanishes: start from a slow pan.)
    still = pan_video(0.5, frames=3, size=64).permute(1, 0, 2, 3).unsqueeze(0)  # (1, 3, F, H, W)
    moving = pan_video(2.0, frames=3, size=64).permute(1, 0, 2, 3).unsqueeze(0)
    assert video_motion(moving).item() == pytest.approx(2.0, rel=0.05)
    video = still.clone().requires_grad_(True)
    distance = preserve_distance(video, moving, "motion")
    assert distance.item() == pytest.approx((video_motion(still) - video_motion(moving)).pow(2).item(), rel=1e-5)
    distance.backward()
    assert torch.isfinite(video.grad).all() and video.grad.abs().sum() > 0
    # At the base itself the distance and its gradient are zero.
    same = moving.clone().requires_grad_(True)
    at_base = preserve_distance(same, moving, "motion")
    at_base.backward()
    assert at_base.item() == 0.0 and same.grad.abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="at least 2 decoded frames"):
        preserve_distance(video[:, :, :1], moving[:, :, :1], "motion")


class FlatReward(Reward):
    """A reward with no gradient at all: only the preserve term moves the LoRA."""

    name = "flat"

    def score(self, frames, prompts):
        return frames.float().flatten(1).mean(dim=1) * 0.0


def _random_lora_file(pipe, path, seed=0):
    from easyanimate_reward.training.lora_layers import LoraLayers

    lora = LoraLayers(pipe.transformer, rank=2, alpha=2.0, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for up in lora.up:
            up.copy_(torch.randn(up.shape, generator=generator) * 0.3)
    save_lora_file(path, lora.to_weights(), dtype=torch.float32)
    return path


def _distance_to_base(trainer, pipe, prompts, seeds, mode):
    from easyanimate_reward.training.rollout import PromptBank, rollout_video

    bank = PromptBank(pipe, prompts)
    trainer.lora.attach(pipe.transformer)
    try:
        with torch.no_grad():
            video = rollout_video(pipe, trainer.settings, bank.cond(prompts), None, seeds, ())
            base = trainer.guards.base_rollout(
                lambda: rollout_video(pipe, trainer.settings, bank.cond(prompts), None, seeds, ()))
    finally:
        trainer.lora.detach()
    return preserve_distance(video, base, mode).item()


@pytest.mark.parametrize("preserve", ["frames", "motion"])
def test_preserve_pulls_a_lora_back_to_the_base_model(pipe, tmp_path, preserve):
    start = _random_lora_file(pipe, tmp_path / "start.safetensors")
    prompts = ["a red ball"]
    config = tiny_config(preserve=preserve, preserve_weight=100.0, train_steps=6, num_decoded_latents=2,
                         backprop="all", learning_rate=1e-3)
    before = RewardLoRATrainer(EasyAnimateModel(pipe), FlatReward(), prompts, config, resume_from=start)
    before._freeze_frozen_parts()
    before._build_lora()
    seeds = [config.seed]
    initial = _distance_to_base(before, pipe, prompts, seeds, preserve)
    assert initial > 0
    trainer = RewardLoRATrainer(EasyAnimateModel(pipe), FlatReward(), prompts, config, resume_from=start,
                                output_path=tmp_path / f"out_{preserve}.safetensors")
    result = trainer.train()
    assert result.stop_reason == "finished"
    # The reward has no gradient: whatever moved the LoRA was the preserve term, towards the base.
    assert any(g > 0 for g in result.state.history["grad_norm"])
    assert _distance_to_base(trainer, pipe, prompts, seeds, preserve) < 0.7 * initial


def test_preserve_is_off_by_default_and_checked():
    assert TrainConfig().preserve == "none"
    with pytest.raises(ValueError, match="preserve must be one of"):
        tiny_config(preserve="everything").validate()
    with pytest.raises(ValueError, match="preserve_weight"):
        tiny_config(preserve="frames", preserve_weight=float("nan")).validate()


# -- frames for time-aware terms ---------------------------------------------------------------


def test_trainer_decodes_enough_latents_for_a_motion_term_and_warns_on_one_frame(pipe, caplog):
    reward = normalized_combination([(ColorfulnessReward(), 1.0), (load_reward("motion"), 0.5)])
    trainer = RewardLoRATrainer(EasyAnimateModel(pipe), reward, ["a"], tiny_config())
    assert (trainer.settings.num_decoded_latents, trainer.settings.num_sampled_frames) == (2, 5)
    image_only = RewardLoRATrainer(EasyAnimateModel(pipe), ColorfulnessReward(), ["a"], tiny_config())
    assert (image_only.settings.num_decoded_latents, image_only.settings.num_sampled_frames) == (1, 1)
    with caplog.at_level(logging.WARNING, logger="easyanimate_reward.training.guards"):
        RewardLoRATrainer(EasyAnimateModel(pipe), reward, ["a"], tiny_config(motion_latents=0))
    assert "sees a single frame per video" in caplog.text


# -- held-out motion, base model, stop rule ------------------------------------------------------


def test_held_out_motion_is_recorded_against_the_base_model_and_plotted(pipe, tmp_path):
    config = tiny_config(eval_every=1, train_steps=2)
    output = tmp_path / "run.safetensors"
    result = RewardLoRATrainer(EasyAnimateModel(pipe), ColorfulnessReward(), ["a red ball"], config,
                               output_path=output, eval_prompts=["a blue cube", "a green tree"]).train()
    history = result.state.history
    assert history["eval_step"] == [0, 1, 2]
    assert len(history["eval_motion"]) == 3 and all(m > 0 for m in history["eval_motion"])
    # Step 0 is the fresh LoRA, i.e. the base model itself: no change.
    assert history["eval_motion_change"][0] == 0.0
    base = json.loads(RunLayout.for_lora_file(output).run_json.read_text())["guards"]["base"]
    assert base["motion"] == history["eval_motion"][0]
    expected = [100 * (m - base["motion"]) / base["motion"] for m in history["eval_motion"]]
    assert history["eval_motion_change"] == pytest.approx(expected)
    assert history_plot(history).shape == (1, 900, 640, 3)  # reward, loss and motion panels

    # A resume measures the base again with the LoRA switched off: the same numbers.
    resumed = RewardLoRATrainer(EasyAnimateModel(pipe), ColorfulnessReward(), ["a red ball"],
                                tiny_config(eval_every=1, train_steps=3), output_path=output,
                                eval_prompts=["a blue cube", "a green tree"], resume_from=output).train()
    assert resumed.state.history["eval_motion"][:3] == history["eval_motion"]
    assert json.loads(RunLayout.for_lora_file(output).run_json.read_text())["guards"]["base"]["motion"] == pytest.approx(base["motion"])


def _guards(base, drop):
    trainer = SimpleNamespace(config=SimpleNamespace(eval_motion=True, motion_stop_drop=drop, motion_latents=2),
                              reward=ColorfulnessReward(), state=SimpleNamespace(step=5, history={"eval_step": []}))
    guards = TrainingGuards(trainer)
    guards.base = base
    return guards


def test_stop_rule_reward_up_motion_down():
    base = {"reward": 1.0, "motion": 2.0}
    off = _guards(base, 0.0)
    assert off.record_eval(1.5, 1.0) is False  # 0 = rule off
    rule = _guards(base, 20.0)
    assert rule.record_eval(1.5, 1.8) is False  # motion -10%: within the limit
    assert rule.record_eval(0.9, 1.0) is False  # motion -50% but the reward is not up
    assert rule.record_eval(1.5, 1.0) is True  # reward up, motion -50%
    assert "motion fell 50.0%" in rule.stop_reason
    assert rule.trainer.state.history["eval_motion_change"] == pytest.approx([-10.0, -50.0, -50.0])


# -- normalised combinations -------------------------------------------------------------------


def test_scale_normalisation_makes_weights_mean_what_they_say():
    frames = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    colour, contrast = load_reward("colorfulness"), load_reward("contrast")
    raw = normalized_combination([(colour, 1.0), (contrast, 1.0)])
    # Raw: colourfulness (~50) drowns contrast (~0.2).
    assert (raw(frames) - colour(frames)).abs().max() < 0.5
    scaled = normalized_combination([(colour, 1.0), (contrast, 0.5)], "scale")
    c, k = colour.typical_range, contrast.typical_range
    expected = (colour(frames) - c.low) / (c.high - c.low) + 0.5 * (contrast(frames) - k.low) / (k.high - k.low)
    assert torch.allclose(scaled(frames), expected, rtol=1e-5)
    # Gradients of both terms arrive, in proportion to their normalised weights.
    x = frames.clone().requires_grad_(True)
    scaled(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_every_kind_documents_a_typical_range():
    from easyanimate_reward.reward.ranges import range_for

    for kind in REWARD_KINDS:
        limits = range_for(kind)
        assert limits is not None and limits.low < limits.high and limits.source, kind
    assert range_for("pickscore", {"use_logit_scale": False}).high < 1.0


def test_zscore_statistics_update_only_when_asked():
    term = NormalizedReward(ContrastReward(), "zscore", TypicalRange(0.0, 0.4, "test"))
    frames = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prior = term(frames)
    assert torch.allclose(prior, (ContrastReward()(frames) - 0.2) / 0.1)  # the range's prior before any data
    assert term.count == 0  # scoring outside training never changes the statistics
    with updating_statistics(term):
        term(frames)
    raw = ContrastReward()(frames).double()
    assert term.count == 6
    assert term.mean == pytest.approx(raw.mean().item())
    assert term.current()[1] == pytest.approx(raw.std().item(), rel=1e-6)
    state = term.statistics_state()
    fresh = NormalizedReward(ContrastReward(), "zscore", TypicalRange(0.0, 0.4, "test"))
    fresh.load_statistics_state(state)
    assert torch.equal(fresh(frames), term(frames))


def test_zscore_state_is_saved_with_checkpoints_restored_on_resume_and_reset_between_runs(pipe, tmp_path):
    reward = normalized_combination([(ColorfulnessReward(), 1.0), (ContrastReward(), 1.0)], "zscore")
    reward.freeze()
    output = tmp_path / "z.safetensors"
    config = tiny_config(train_steps=2, batch_size=2)
    RewardLoRATrainer(EasyAnimateModel(pipe), reward, ["a red ball", "a blue cube"], config,
                      output_path=output).train()
    saved = json.loads(RunLayout.for_lora_file(output).run_json.read_text())["guards"]["reward_normalization"]
    assert [s["count"] for s in saved] == [4, 4]  # 2 steps x 2 videos x 1 frame, per term
    first_run = [m.statistics_state() for m in reward.modules() if isinstance(m, NormalizedReward)]
    # The same reward object queued again (ComfyUI caches it): a new run starts from zero.
    RewardLoRATrainer(EasyAnimateModel(pipe), reward, ["a red ball", "a blue cube"], config,
                      output_path=tmp_path / "again.safetensors").train()
    assert [m.statistics_state() for m in reward.modules() if isinstance(m, NormalizedReward)] == first_run
    # A resume continues the saved statistics.
    RewardLoRATrainer(EasyAnimateModel(pipe), reward, ["a red ball", "a blue cube"], tiny_config(train_steps=3,
                      batch_size=2), output_path=output, resume_from=output).train()
    resumed = json.loads(RunLayout.for_lora_file(output).run_json.read_text())["guards"]["reward_normalization"]
    assert [s["count"] for s in resumed] == [6, 6]
