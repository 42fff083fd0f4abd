"""Settings of a reward-backprop LoRA run, and which sampling steps keep gradients.

Defaults follow the official EasyAnimate reward trainer (256x256, 49 frames, 50 steps, cfg 6,
rank 128 / alpha 64, AdamW lr 1e-5, weight decay 3e-2, eps 1e-10, grad clip 0.3), but every size
may be small so that the same code runs on tiny test models.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, fields

# How the steps that keep a graph are chosen (indices into the sampler's timesteps, 0 = first):
# last: the final step only (official V5 default).
# tail: the last K steps (official V5.1 default, K = 10: last-step gradients vanish with flow matching).
# uniform: K steps spread evenly over the whole trajectory (always the first and the last).
# random: K distinct steps drawn anew each training step from [start, end].
# list: an explicit list such as "0, 10, -1" (negative counts from the end).
# all: every step (full backprop through the whole chain; memory grows with the step count).
# auto: last for V5 (DDIM), tail K for V5.1 (flow matching).
BACKPROP_STRATEGIES = ("auto", "last", "tail", "uniform", "random", "list", "all")


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


def resolve_strategy(strategy: str, flow_matching: bool) -> str:
    if strategy not in BACKPROP_STRATEGIES:
        raise ValueError(f"unknown backprop strategy {strategy!r}; choose one of {', '.join(BACKPROP_STRATEGIES)}")
    if strategy == "auto":
        return "tail" if flow_matching else "last"
    return strategy


def select_grad_steps(strategy: str, total: int, k: int = 1, start: int = 0, end: int = -1,
                      step_list: str = "", rng: random.Random | None = None) -> list[int]:
    """Indices of the sampling steps whose transformer call keeps a graph. `rng` drives 'random'."""
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
    num_sampled_frames: int = 1
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
    # memory (training/memory_options.py)
    activation_offload: bool = False  # tensors saved for backward go to CPU RAM (save_on_cpu)
    optimizer: str = "adamw"  # "adamw" or "adamw_8bit" (bitsandbytes)

    def validate(self) -> "TrainConfig":
        from ..easyanimate.sampling import check_video_size

        check_video_size(self.width, self.height, self.frames)
        positive = ("sampling_steps", "rank", "train_steps", "grad_accumulation", "batch_size",
                    "num_decoded_latents", "num_sampled_frames")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("save_every", "eval_every", "early_stop_patience"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.adam_eps <= 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("learning_rate and adam_eps must be > 0; weight_decay and max_grad_norm >= 0")
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
            import re

            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"target_modules {self.target_modules!r} is not a valid regular expression: {e}") from e
        from .memory_options import check_optimizer_name

        check_optimizer_name(self.optimizer)
        if self.backprop == "list":
            parse_step_list(self.backprop_steps, self.sampling_steps)
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
