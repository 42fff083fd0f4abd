"""The trainer node's inputs for the motion guards (training/guards.py), kept apart from the
trainer node's own schema. All optional: older workflows keep working with the defaults."""

from __future__ import annotations

from comfy_api.latest import io

from ..training.config import TrainConfig
from ..training.guards import PRESERVE_MODES

_DEFAULTS = TrainConfig()
GUARD_FIELDS = ("motion_latents", "eval_motion", "motion_stop_drop", "preserve", "preserve_weight")


def guard_inputs() -> list:
    return [
        io.Int.Input("motion_latents", default=_DEFAULTS.motion_latents, min=0, max=64, optional=True,
                     tooltip="When the reward has a time-aware term (motion, temporal_consistency): decode at least "
                             "this many latents (k latents = 1 + 4(k-1) frames) and, if num_sampled_frames is 1, "
                             "score all of their frames. 0: as set (a warning says when such a term sees one frame)."),
        io.Boolean.Input("eval_motion", default=_DEFAULTS.eval_motion, optional=True,
                         tooltip="Held-out evaluation also measures the motion of the held-out videos and its change "
                                 "against the base model's videos on the same seeds (computed once at the start), "
                                 "plotted under the reward."),
        io.Float.Input("motion_stop_drop", default=_DEFAULTS.motion_stop_drop, min=0.0, max=100.0, step=0.5,
                       optional=True,
                       tooltip="Stop when the held-out reward is above the base model's while the held-out motion "
                               "fell by more than this many % (reward up, motion down). 0: off. Needs held-out "
                               "prompts and eval_every."),
        io.Combo.Input("preserve", options=list(PRESERVE_MODES), default=_DEFAULTS.preserve, optional=True,
                       tooltip="Penalise the distance to the base model (the model as wired, without the LoRA being "
                               "trained) on the same noise: 'motion' of each video or the 'frames' themselves. "
                               "Every rollout is run twice (with and without the LoRA): it DOUBLES the rollout cost."),
        io.Float.Input("preserve_weight", default=_DEFAULTS.preserve_weight, min=0.0, max=1e6, step=0.1, round=False,
                       optional=True,
                       tooltip="Weight of the preserve penalty (squared motion difference in (px/frame)^2, or mean "
                               "squared pixel difference) added to the loss."),
    ]


def guard_settings(values: dict) -> dict:
    """TrainConfig fields from the node's optional guard inputs (missing ones keep their defaults)."""
    unknown = sorted(set(values) - set(GUARD_FIELDS))
    if unknown:
        raise TypeError(f"unexpected trainer inputs {unknown}")
    return {name: values[name] for name in GUARD_FIELDS if values.get(name) is not None}
