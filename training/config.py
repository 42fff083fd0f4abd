"""Settings of a reward-backprop LoRA run, and which sampling steps keep gradients.

Defaults follow the official EasyAnimate reward trainer (256x256, 49 frames, 50 steps, cfg 6,
rank 128 / alpha 64, AdamW lr 1e-5, weight decay 3e-2, eps 1e-10, grad clip 0.3), but every size
may be small so that the same code runs on tiny test models.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict, dataclass, fields

# How the steps that keep a graph are chosen (indices into the sampler's timesteps, 0 = first):
# last: the final step only (official V5 default).
# tail: the last K steps (official V5.1 default, K = 10: last-step gradients vanish with flow matching).
# uniform: K steps r + i * (T // K), i = 0..K-1, with a fresh offset r drawn from [0, T // K - 1] at
#   every training step (seeded by the run, so resumes draw the same): always exactly K steps.
#   (The official trainer draws r from [0, T // K], so that step T sometimes falls out and K - 1 train.)
# spread: K fixed steps spread evenly over the whole trajectory (always the first and the last).
# random: K distinct steps drawn anew each training step from [start, end].
# list: an explicit list such as "0, 10, -1" (negative counts from the end).
# all: every step (full backprop through the whole chain; memory grows with the step count).
# auto: last for V5 (DDIM), tail K for V5.1 (flow matching); with a step list given: list.
BACKPROP_STRATEGIES = ("auto", "last", "tail", "uniform", "spread", "random", "list", "all")


def parse_step_list(text: str, total: int) -> list[int]:
    """"0, 10, -1" -> sorted distinct indices in [0, total); negative indices count from the end."""
    steps = set()
    for part in str(text).replace(";", ",").replace(" ", ",").split(","):
        if not part:
            continue
        try:
            index = int(part)
        except ValueError:
            raise ValueError(f"backprop step list {text!r}: {part!r} is not an integer") from None
        if index < 0:
            index += total
        if not 0 <= index < total:
            raise ValueError(f"backprop step list {text!r}: step {part} is outside 0..{total - 1} "
                             f"(the sampler runs {total} steps)")
        steps.add(index)
    if not steps:
        raise ValueError("backprop strategy 'list' needs at least one step index, e.g. '0, 10, -1'")
    return sorted(steps)


def resolve_strategy(strategy: str, flow_matching: bool, step_list: str = "") -> str:
    """The strategy that runs: 'auto' becomes 'list' when a step list is given, else last / tail."""
    if strategy not in BACKPROP_STRATEGIES:
        raise ValueError(f"unknown backprop strategy {strategy!r}; choose one of {', '.join(BACKPROP_STRATEGIES)}")
    if strategy == "auto":
        if str(step_list or "").strip():
            return "list"
        return "tail" if flow_matching else "last"
    return strategy


def select_grad_steps(strategy: str, total: int, k: int = 1, start: int = 0, end: int = -1,
                      step_list: str = "", rng: random.Random | None = None) -> list[int]:
    """Indices of the sampling steps whose transformer call keeps a graph. `rng` drives the draws
    of 'uniform' (the offset) and 'random' (the steps)."""
    if total < 1:
        raise ValueError("the sampler needs at least one step")
    if strategy == "last":
        return [total - 1]
    if strategy == "all":
        return list(range(total))
    if strategy == "list":
        return parse_step_list(step_list, total)
    if k < 1:
        raise ValueError(f"backprop strategy {strategy!r} needs K >= 1, got {k}")
    k = min(k, total)
    if strategy == "tail":
        return list(range(total - k, total))
    if strategy == "uniform":
        stride = total // k
        offset = (rng or random.Random(0)).randrange(stride)  # r in [0, T // K - 1]: K steps always train
        return [offset + i * stride for i in range(k)]
    if strategy == "spread":
        if k == 1:
            return [total - 1]
        return sorted({round(i * (total - 1) / (k - 1)) for i in range(k)})
    if strategy == "random":
        first = start + total if start < 0 else start
        last = end + total if end < 0 else end
        first, last = max(0, first), min(total - 1, last)
        if first > last:
            raise ValueError(f"backprop range [{start}, {end}] is empty for {total} sampling steps")
        pool = list(range(first, last + 1))
        rng = rng or random.Random(0)
        return sorted(rng.sample(pool, min(k, len(pool))))
    raise ValueError(f"unknown backprop strategy {strategy!r}; choose one of {', '.join(BACKPROP_STRATEGIES)}")


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def parse_optional_number(text: str | None, name: str) -> float | None:
    """A setting typed as text: empty -> None, else a plain finite decimal number ("1", "-0.5",
    "1e-3"). NaN, inf, values that overflow to inf (1e400) and Python-only spellings ("1_0") are
    refused with a message naming the setting."""
    text = (text or "").strip()
    if not text:
        return None
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"{name} {text!r} must be a finite plain number such as 1 or 0.5, or empty")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{name} {text!r} is too large (it is not a finite number)")
    return value


def decoded_frame_count(num_latents: int) -> int:
    """The Magvit VAE turns k latents into 1 + 4 (k - 1) frames."""
    return 1 + 4 * (num_latents - 1)


@dataclass
class TrainConfig:
    # rollout
    width: int = 256
    height: int = 256
    frames: int = 49
    sampling_steps: int = 50
    guidance_scale: float = 6.0
    negative_prompt: str = ""
    scheduler: str = "auto"
    backprop: str = "auto"
    backprop_k: int = 10
    backprop_start: int = 0
    backprop_end: int = -1
    backprop_steps: str = ""
    detach_input: bool = False  # DRTune: stop-gradient at the transformer input on grad steps
    num_decoded_latents: int = 1
    num_sampled_frames: int = 1  # frames scored, spread like linspace(0, F - 1, n).long(); 0 = all decoded frames
    shift: float = 0.0  # flow-matching models: 0 = the folder's own schedule
    # inference speed-ups, off in training and held-out evaluation unless turned on here
    teacache: bool = False
    teacache_threshold: float = 0.10
    cfg_skip_ratio: float = 0.0
    # loss
    max_reward: float | None = None  # set: loss = |reward - max_reward| * scale; else -reward * scale
    loss_scale: float = 1.0
    # LoRA
    rank: int = 128
    alpha: float = 64.0
    target_modules: str = ""  # regex on module paths (diffusers or original names); "" = every Linear
    # optimisation
    train_steps: int = 2000
    learning_rate: float = 1e-5
    weight_decay: float = 3e-2
    adam_eps: float = 1e-10
    max_grad_norm: float = 0.3  # 0 disables clipping
    grad_accumulation: int = 1
    batch_size: int = 1
    seed: int = 42
    gradient_checkpointing: bool = True
    # checkpoints and held-out evaluation
    save_every: int = 100  # 0: only at the end
    eval_every: int = 0  # 0: no held-out evaluation
    early_stop_patience: int = 0  # evaluations without a held-out improvement before stopping; 0: never
    # guards against lost motion and reward hacking (training/guards.py)
    motion_latents: int = 2  # a reward with a time-aware term decodes at least this many latents; 0: as set
    eval_motion: bool = True  # held-out evaluation also measures motion, against the base model's
    motion_stop_drop: float = 0.0  # % : stop when held-out reward is up and motion down by more; 0: off
    preserve: str = "none"  # "motion" | "frames": penalise the distance to the base model's rollout
    preserve_weight: float = 1.0
    # memory (training/memory_options.py)
    activation_offload: bool = False  # tensors saved for backward go to CPU RAM (save_on_cpu)
    optimizer: str = "adamw"  # "adamw" or "adamw_8bit" (bitsandbytes)

    def validate(self) -> "TrainConfig":
        from ..easyanimate.sampling import check_video_size

        check_video_size(self.width, self.height, self.frames)
        positive = ("sampling_steps", "rank", "train_steps", "grad_accumulation", "batch_size",
                    "num_decoded_latents")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("save_every", "eval_every", "early_stop_patience", "num_sampled_frames"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        if self.learning_rate <= 0 or self.adam_eps <= 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("learning_rate and adam_eps must be > 0; weight_decay and max_grad_norm >= 0")
        if self.loss_scale <= 0:
            raise ValueError(f"loss_scale must be > 0, got {self.loss_scale}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.backprop not in BACKPROP_STRATEGIES:
            raise ValueError(f"unknown backprop strategy {self.backprop!r}; choose one of {', '.join(BACKPROP_STRATEGIES)}")
        latents = (self.frames - 1) // 4 + 1
        if self.num_decoded_latents > latents:
            raise ValueError(f"num_decoded_latents {self.num_decoded_latents} exceeds the {latents} latents "
                             f"of a {self.frames}-frame video")
        available = decoded_frame_count(self.num_decoded_latents)
        if self.num_sampled_frames > available:
            raise ValueError(f"num_sampled_frames {self.num_sampled_frames} exceeds the {available} frames that "
                             f"{self.num_decoded_latents} decoded latents give (1 + 4 (k - 1))")
        if self.target_modules:
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"target_modules {self.target_modules!r} is not a valid regular expression: {e}") from e
        from .memory_options import check_optimizer_name

        check_optimizer_name(self.optimizer)
        has_list = bool(str(self.backprop_steps or "").strip())
        if has_list and self.backprop not in ("list", "auto"):
            raise ValueError(f"backprop_steps {self.backprop_steps!r} is given but backprop is {self.backprop!r}: "
                             "a step list is used only with backprop 'list' (or 'auto', which then means 'list'); "
                             "clear backprop_steps or choose 'list'")
        if self.backprop == "list" or has_list:
            parse_step_list(self.backprop_steps, self.sampling_steps)
        from ..easyanimate.step_cache import SpeedSettings
        from .guards import validate_guard_settings

        SpeedSettings(self.teacache, self.teacache_threshold, self.cfg_skip_ratio).validate()
        validate_guard_settings(self)
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
