"""Guards against reward hacking and lost dynamism in reward training (issue 13).

Kept apart from the training loop; the trainer calls it at a few places:

- **Frames for time-aware terms.** When the reward has a time-aware term (motion, temporal
  consistency), `rollout_settings` decodes at least `motion_latents` latents (k latents =
  1 + 4 (k - 1) frames) and, when `num_sampled_frames` is 1, scores all of their frames, so the
  term sees motion at all. A time-aware term that would still see one frame per video is
  warned about (it then scores 0 and teaches nothing).
- **Held-out motion.** With held-out evaluation, the motion of the held-out videos (the
  weight-free `motion` reward on every decoded frame, at least `motion_latents` latents) is
  recorded beside the held-out reward, with its change in % against the base model's videos on
  the same seeds (the base = the model as wired, without the LoRA being trained; evaluated once
  at the start of every run, or taken from the step-0 evaluation of a fresh LoRA, which equals
  the base). History keys `eval_motion` and `eval_motion_change`, plotted under the reward.
- **Stop rule.** `motion_stop_drop` X > 0: stop when the held-out reward is above the base's
  and the held-out motion is more than X % below the base's ("reward up, motion down").
- **Preserve.** `preserve` "motion" or "frames": every rollout is repeated without the LoRA on
  the same noise and prompts (twice the rollout cost), and the loss gets `preserve_weight` x the
  squared distance of the motion (per video, pixels per frame) or of the frames (mean squared
  pixel difference) to that base rollout. The base video carries no gradient.
- **Reward normalisation state.** Running z-score statistics of a normalised combined reward
  (reward/combine.py) are reset at the start of a run, updated on training rollouts only, and
  saved in the checkpoint's sidecar (`extra_state`), from which a resume restores them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING

import torch

from ..reward.video import MotionReward, time_aware_terms
from .config import PRESERVE_MODES, decoded_frame_count

if TYPE_CHECKING:
    from .trainer import RewardLoRATrainer

log = logging.getLogger(__name__)

GUARD_STATE_KEY = "guards"  # key of the guard state in a checkpoint's sidecar


def video_motion(video: torch.Tensor, meter: MotionReward | None = None) -> torch.Tensor:
    """(B, 3, F, H, W) -> (B,) mean flow magnitude of each video (pixels per frame)."""
    meter = meter or MotionReward()
    frames = video.permute(0, 2, 1, 3, 4).reshape(-1, *video.shape[1:2], *video.shape[3:])
    per_frame = torch.cat([meter(clip) for clip in frames.split(video.shape[2])])
    return per_frame.view(video.shape[0], video.shape[2]).mean(dim=1)


def preserve_distance(video: torch.Tensor, base: torch.Tensor, mode: str,
                      meter: MotionReward | None = None) -> torch.Tensor:
    """Mean over the batch of the squared distance to the base rollout: of the per-video motion
    ("motion") or of the pixels ("frames"). `base` is treated as a constant."""
    base = base.detach()
    if mode == "frames":
        return (video.float() - base.float()).pow(2).mean()
    if mode == "motion":
        if video.shape[2] < 2:
            raise ValueError("preserve 'motion' needs at least 2 decoded frames (num_decoded_latents >= 2)")
        return (video_motion(video, meter) - video_motion(base, meter)).pow(2).mean()
    raise ValueError(f"preserve must be one of {', '.join(PRESERVE_MODES)}, got {mode!r}")


def normalizers(reward) -> list:
    from ..reward.combine import NormalizedReward

    return [m for m in reward.modules() if isinstance(m, NormalizedReward)]


class TrainingGuards:
    def __init__(self, trainer: "RewardLoRATrainer"):
        self.trainer = trainer
        self.config = trainer.config
        self.meter = MotionReward()
        self.time_aware = bool(time_aware_terms(trainer.reward))
        self.base: dict | None = None  # {"reward": float, "motion": float} of the base model's held-out videos
        self.stop_reason: str | None = None

    # -- frames --------------------------------------------------------------------------------

    def rollout_settings(self, settings):
        """The training rollout's settings with enough decoded frames for a time-aware reward."""
        cfg = self.config
        total_latents = (settings.frames - 1) // 4 + 1
        if self.time_aware and cfg.motion_latents > 0:
            latents = max(settings.num_decoded_latents, min(cfg.motion_latents, total_latents))
            frames = settings.num_sampled_frames if settings.num_sampled_frames > 1 else decoded_frame_count(latents)
            if (latents, frames) != (settings.num_decoded_latents, settings.num_sampled_frames):
                log.info("the reward has a time-aware term: decoding %d latents and scoring %d frames per video",
                         latents, frames)
            settings = dataclasses.replace(settings, num_decoded_latents=latents, num_sampled_frames=frames)
        if self.time_aware and min(settings.num_sampled_frames, decoded_frame_count(settings.num_decoded_latents)) < 2:
            log.warning("the reward has a time-aware term (motion / temporal consistency) but sees a single frame per "
                        "video: it scores 0 and teaches nothing. Decode at least 2 latents and sample >= 2 frames "
                        "(or set motion_latents >= 2).")
        return settings

    @property
    def measures_motion(self) -> bool:
        return self.config.eval_motion or self.config.motion_stop_drop > 0

    def eval_settings(self, settings):
        """Held-out rollouts decode enough latents to measure motion (the reward still scores the
        same frames as before: the causal VAE decodes the first frames identically)."""
        if not self.measures_motion:
            return settings
        total_latents = (settings.frames - 1) // 4 + 1
        latents = max(settings.num_decoded_latents, min(max(self.config.motion_latents, 2), total_latents))
        return dataclasses.replace(settings, num_decoded_latents=latents)

    def reward_frames(self, video: torch.Tensor) -> torch.Tensor:
        """The part of a held-out video the reward scores (the training rollout's decoded frames)."""
        return video[:, :, :decoded_frame_count(self.trainer.settings.num_decoded_latents)]

    def eval_motion(self, video: torch.Tensor) -> torch.Tensor | None:
        if not self.measures_motion or video.shape[2] < 2:
            return None
        return video_motion(video, self.meter)

    # -- base model ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def without_lora(self):
        """The model as wired, without the LoRA being trained (its hooks removed for the block)."""
        lora = self.trainer.lora
        lora.detach()
        try:
            yield
        finally:
            lora.attach(self.trainer.pipe.transformer)

    def _lora_is_zero(self) -> bool:
        return all(not bool(up.detach().abs().max() > 0) for up in self.trainer.lora.up)

    def prepare_base(self, pipe, bank) -> None:
        """Held-out reward and motion of the base model, once per run. A fresh LoRA (up = 0) IS
        the base, so its step-0 evaluation is used instead (see `record_eval`)."""
        if not self.measures_motion or self.base is not None:
            return
        if not self.trainer.state.history["eval_step"] and self._lora_is_zero():
            return
        with self.without_lora():
            reward, _ = self.trainer.evaluate(pipe, bank)
        self.base = {"reward": reward, "motion": self.trainer._last_eval_motion}
        log.info("base model on the held-out seeds: reward %.5g, motion %s", reward, self.base["motion"])

    def base_rollout(self, rollout):
        """`rollout()` (a no-argument function running the same rollout) without the LoRA, no graph."""
        with torch.no_grad(), self.without_lora():
            return rollout()

    def preserve_loss(self, video: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return self.config.preserve_weight * preserve_distance(video, base, self.config.preserve, self.meter)

    # -- held-out records and the stop rule -----------------------------------------------------

    def record_eval(self, reward: float, motion: float | None) -> bool:
        """Store motion and its change in the history; True when the stop rule triggers."""
        history = self.trainer.state.history
        if not self.measures_motion:
            return False
        if self.base is None and self.trainer.state.step == 0 and self._lora_is_zero():
            self.base = {"reward": reward, "motion": motion}
        base_motion = None if self.base is None else self.base.get("motion")
        change = None
        if motion is not None and base_motion is not None and base_motion > 0:
            change = 100.0 * (motion - base_motion) / base_motion
        history.setdefault("eval_motion", []).append(motion)
        history.setdefault("eval_motion_change", []).append(change)
        if motion is not None:
            log.info("held-out motion %.4g px/frame (%s vs the base model)", motion,
                     "n/a" if change is None else f"{change:+.1f}%")
        drop = self.config.motion_stop_drop
        if drop > 0 and change is not None and self.base is not None and reward > self.base["reward"] \
                and change < -drop:
            self.stop_reason = (f"motion guard: held-out reward {reward:.5g} above the base's {self.base['reward']:.5g} "
                                f"while held-out motion fell {-change:.1f}% (limit {drop:g}%)")
            log.warning("stopping: %s", self.stop_reason)
            return True
        return False

    # -- state in checkpoints ------------------------------------------------------------------

    def reset(self) -> None:
        for module in normalizers(self.trainer.reward):
            module.reset_statistics()

    def updating_statistics(self):
        from ..reward.combine import updating_statistics

        return updating_statistics(self.trainer.reward)

    def extra_state(self) -> dict:
        return {"base": self.base,
                "reward_normalization": [m.statistics_state() for m in normalizers(self.trainer.reward)]}

    def restore(self, sidecar: dict | None) -> None:
        """From the sidecar of the checkpoint resumed from: normalisation statistics and the
        held-out motion history (trimmed to the evaluations the resumed state kept)."""
        if not sidecar:
            return
        state = sidecar.get(GUARD_STATE_KEY) or {}
        stats = state.get("reward_normalization") or []
        modules = normalizers(self.trainer.reward)
        if len(stats) == len(modules):
            for module, saved in zip(modules, stats):
                module.load_statistics_state(saved)
        elif stats or modules:
            log.warning("the resumed checkpoint has %d reward-normalisation states, the reward %d: statistics restart",
                        len(stats), len(modules))
        history, saved_history = self.trainer.state.history, sidecar.get("history") or {}
        count = len(history["eval_step"])
        for key in ("eval_motion", "eval_motion_change"):
            values = list(saved_history.get(key) or [])[:count]
            history[key] = values + [None] * (count - len(values))
