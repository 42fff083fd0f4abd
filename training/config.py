"""Settings of a reward-backprop LoRA run, and which sampling steps keep gradients.

Defaults follow the official EasyAnimate reward trainer (256x256, 49 frames, 50 steps, cfg 6,
rank 128 / alpha 64, AdamW lr 1e-5, weight decay 3e-2, eps 1e-10, grad clip 0.3), but every size
may be small so that the same code runs on tiny test models.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass, fields

from ..easyanimate.schedulers import SCHEDULER_CHOICES
from .memory_options import OPTIMIZERS
from .settings import EVALUATION, LOGGING, OPTIMIZER, ROLLOUT, RUN, rows, setting

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


PRESERVE_MODES = ("none", "motion", "frames")  # training/guards.py
LR_SCHEDULERS = ("constant", "linear", "cosine")  # diffusers.optimization.get_scheduler, with warmup
LOSS_PRESETS = ("none", "official")
# The official trainer's per-reward loss settings (max_reward, loss_scale). They assume EasyAnimate's
# scores (PickScore / MPS as the plain cosine): training/loss_presets.py checks the reward matches.
OFFICIAL_LOSS_PRESETS = {"hps": (1.0, 1.0), "pickscore": (1.0, 1.0), "mps": (1.0, 1.0), "aesthetic": (10.0, 0.1)}
_PRESET_TEXT = ", ".join(f"{k} max_reward {m:g} loss_scale {s:g}" for k, (m, s) in OFFICIAL_LOSS_PRESETS.items())


@dataclass
class TrainConfig:
    # on the trainer node itself
    train_steps: int = setting(2000, RUN, "Optimizer steps (the official runs use 2000-3500).", min=1, max=1_000_000)
    seed: int = setting(42, RUN, "Seeds the LoRA init, the prompt order and the rollout noise.", min=0, max=0xFFFFFFFFFFFF)
    # rollout
    width: int = setting(256, ROLLOUT, "Training resolution, multiple of 16.", min=16, max=2048, step=16)
    height: int = setting(256, ROLLOUT, "Training resolution, multiple of 16.", min=16, max=2048, step=16)
    frames: int = setting(49, ROLLOUT, "1 + 4k frames sampled per video.", min=1, max=145, step=4)
    sampling_steps: int = setting(50, ROLLOUT, "Denoising steps of each rollout.", min=1, max=200)
    cfg: float = setting(6.0, ROLLOUT, "Guidance scale of the rollout; 1 disables guidance (half the compute).",
                         min=1.0, max=20.0, step=0.1)
    negative_prompt: str = setting("", ROLLOUT, "Negative prompt of the guided rollout (the official trainer uses "
                                                "none).", multiline=True)
    scheduler: str = setting("auto", ROLLOUT, "Sampler of the rollout; auto: the model folder's own (DDIM for V5, "
                                              "flow matching Euler for V5.1).", choices=SCHEDULER_CHOICES)
    eta: float = setting(0.0, ROLLOUT, "DDIM eta: 0 = deterministic DDIM, 1 = DDPM-like noise at every step "
                                       "(drawn per video from its seed). DDIM only.", min=0.0, max=1.0, step=0.01)
    shift: float = setting(0.0, ROLLOUT, "Flow-matching models: the sigma shift; 0 = the folder's own schedule.",
                           min=0.0, max=100.0, step=0.1)
    backprop: str = setting("auto", ROLLOUT,
                            "Which denoising steps keep gradients (the others run without a graph). auto: last for "
                            "V5, tail K for V5.1 (last-step gradients vanish with flow matching). last; tail: the "
                            "last K; uniform: K steps T//K apart from a fresh random offset each step; spread: K "
                            "fixed steps over the whole trajectory; random: K drawn each step from [start, end]; "
                            "list: the steps listed; all: every step (memory grows with the step count).",
                            choices=BACKPROP_STRATEGIES)
    backprop_k: int = setting(10, ROLLOUT, "K for tail / uniform / spread / random.", min=1, max=200)
    backprop_start: int = setting(0, ROLLOUT, "random: first step of the range (negative counts from the end).",
                                  min=-200, max=200)
    backprop_end: int = setting(-1, ROLLOUT, "random: last step of the range (-1 = the last step).", min=-200, max=200)
    backprop_steps: str = setting("", ROLLOUT, "list: step indices such as '0, 25, -1' (with auto: means list).")
    drtune: bool = setting(False, ROLLOUT, "DRTune: stop the gradient at the transformer input on the kept steps, so "
                                           "each step's gradient reaches the LoRA without flowing through earlier "
                                           "steps.")
    num_decoded_latents: int = setting(1, ROLLOUT, "Decode only the first k latents (1 = the first frame; k latents = "
                                                   "1 + 4(k-1) frames).", min=1, max=64)
    num_sampled_frames: int = setting(1, ROLLOUT, "Evenly spaced frames of the decoded part that the reward scores "
                                                  "(linspace(0, F-1, n) rounded down, as the official trainer); "
                                                  "0 = all decoded frames.", min=0, max=256)
    teacache: bool = setting(False, ROLLOUT, "TeaCache in the training rollouts (an inference speed-up: off by "
                                             "default, it skips transformer calls whose gradient may matter).")
    teacache_threshold: float = setting(0.10, ROLLOUT, "TeaCache threshold (higher skips more).", min=0.0, max=1.0,
                                        step=0.01)
    cfg_skip_ratio: float = setting(0.0, ROLLOUT, "Skip the unconditional pass on this share of the last steps "
                                                  "(0: never).", min=0.0, max=1.0, step=0.01)
    gradient_checkpointing: bool = setting(True, ROLLOUT, "Recompute activations in backward (transformer and VAE): "
                                                          "far less memory.")
    activation_offload: bool = setting(False, ROLLOUT, "Keep the tensors saved for backward in CPU RAM (pinned) "
                                                       "instead of on the GPU: less VRAM, more RAM, some transfer "
                                                       "time. No effect on a CPU device.")
    start_images: bool = setting(True, ROLLOUT, "Image-to-video rollouts: a prompt line 'image.png | prompt' (or a "
                                                ".jsonl line with an \"image\" key) starts its video from that image "
                                                "of ComfyUI's input folder (InP models). Off: such lines train as "
                                                "text-to-video with the prompt alone.")
    # LoRA, loss and optimiser
    rank: int = setting(128, OPTIMIZER, "LoRA rank.", min=1, max=1024)
    alpha: float = setting(64.0, OPTIMIZER, "LoRA alpha; the update is scaled by alpha / rank.", min=0.01, max=4096.0,
                           step=0.01)
    target_modules: str = setting("", OPTIMIZER, "Regex on module paths to adapt (e.g. 'attn1\\.to_(q|k|v)'); "
                                                 "empty = every Linear.")
    loss_preset: str = setting("none", OPTIMIZER, "official: max_reward and loss_scale as the official trainer sets "
                                                  f"them for the reward ({_PRESET_TEXT}); they assume EasyAnimate's "
                                                  "scores, so the reward must be loaded with scoring = easyanimate "
                                                  "(PickScore / MPS as the plain cosine). none: the two settings "
                                                  "below.", choices=LOSS_PRESETS)
    max_reward: float | None = setting(None, OPTIMIZER, "Empty: loss = -reward * loss_scale. A finite number: loss = "
                                                        "the mean over frames of |reward - max_reward| * loss_scale "
                                                        "(stops pushing past a target).", optional_number=True)
    loss_scale: float = setting(1.0, OPTIMIZER, "Multiplies the loss.", min=1e-6, max=1e6, step=0.01)
    optimizer: str = setting("adamw", OPTIMIZER, "adamw: torch AdamW. adamw_8bit: bitsandbytes' 8-bit AdamW (about "
                                                 "2 bytes of state per LoRA parameter instead of 8; saved for an "
                                                 "exact resume too).", choices=OPTIMIZERS)
    learning_rate: float = setting(1e-5, OPTIMIZER, "AdamW learning rate (official: 1e-5).", min=0.0, max=1.0,
                                   step=1e-6)
    lr_scheduler: str = setting("constant", OPTIMIZER, "Learning-rate schedule after the warmup (diffusers' "
                                                       "get_scheduler): constant, linear decay to 0, or cosine "
                                                       "decay to 0 at train_steps.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = setting(0, OPTIMIZER, "Steps of linear warmup from 0 to the learning rate.", min=0,
                                   max=1_000_000)
    scale_lr: bool = setting(False, OPTIMIZER, "Multiply the learning rate by grad_accumulation x batch_size x the "
                                               "number of processes (the official --scale_lr).")
    adam_beta1: float = setting(0.9, OPTIMIZER, "AdamW beta1.", min=0.0, max=0.9999, step=0.001)
    adam_beta2: float = setting(0.999, OPTIMIZER, "AdamW beta2.", min=0.0, max=0.99999, step=0.0001)
    weight_decay: float = setting(3e-2, OPTIMIZER, "AdamW weight decay.", min=0.0, max=1.0, step=1e-3)
    adam_eps: float = setting(1e-10, OPTIMIZER, "AdamW epsilon.", min=1e-12, max=1e-3, step=1e-10)
    max_grad_norm: float = setting(0.3, OPTIMIZER, "Gradient-norm clipping; 0 disables it.", min=0.0, max=100.0,
                                   step=0.01)
    grad_accumulation: int = setting(1, OPTIMIZER, "Rollouts per optimizer step.", min=1, max=1024)
    batch_size: int = setting(1, OPTIMIZER, "Prompts per rollout (per process on the CLI).", min=1, max=64)
    # held-out evaluation, validation videos and the motion guards (training/guards.py)
    eval_every: int = setting(0, EVALUATION, "Score the held-out prompts every N steps (0: never). The LoRA with the "
                                             "best held-out reward so far is kept as <name>.best.safetensors.",
                              min=0, max=1_000_000)
    early_stop_patience: int = setting(0, EVALUATION, "Stop after this many held-out evaluations without "
                                                      "improvement (0: never).", min=0, max=10_000)
    motion_latents: int = setting(2, EVALUATION, "When the reward has a time-aware term (motion, "
                                                 "temporal_consistency): decode at least this many latents and, if "
                                                 "num_sampled_frames is 1, score all of their frames. 0: as set.",
                                  min=0, max=64)
    eval_motion: bool = setting(True, EVALUATION, "Held-out evaluation also measures the motion of the held-out "
                                                  "videos against the base model's on the same seeds (plotted).")
    motion_stop_drop: float = setting(0.0, EVALUATION, "Stop when the held-out reward is up while the held-out motion "
                                                       "fell by more than this many % (0: off).", min=0.0,
                                      max=100.0, step=0.5)
    preserve: str = setting("none", EVALUATION, "Penalise the distance to the base model on the same noise: 'motion' "
                                                "of each video or the 'frames' themselves. It DOUBLES the rollout "
                                                "cost.", choices=PRESERVE_MODES)
    preserve_weight: float = setting(1.0, EVALUATION, "Weight of the preserve penalty added to the loss.", min=0.0,
                                     max=1e6, step=0.1)
    validation_every: int = setting(0, EVALUATION, "Every N steps (and at the end) sample the validation prompts at "
                                                   "the validation settings below, save them as MP4s in the run "
                                                   "folder's validation/ and score them (0: never).", min=0,
                                    max=1_000_000)
    validation_width: int = setting(512, EVALUATION, "Validation video width (official: 512).", min=16, max=2048,
                                    step=16)
    validation_height: int = setting(512, EVALUATION, "Validation video height (official: 512).", min=16, max=2048,
                                     step=16)
    validation_frames: int = setting(49, EVALUATION, "Frames of each validation video (whole videos are decoded).",
                                     min=1, max=145, step=4)
    validation_steps: int = setting(50, EVALUATION, "Denoising steps of the validation videos.", min=1, max=200)
    validation_cfg: float = setting(7.0, EVALUATION, "Guidance scale of the validation videos (official: 7).",
                                    min=1.0, max=20.0, step=0.1)
    validation_negative_prompt: str = setting("bad detailed", EVALUATION, "Negative prompt of the validation videos "
                                                                          "(official: 'bad detailed').")
    # checkpoints and logging
    save_every: int = setting(100, LOGGING, "Save the LoRA (and the training state for an exact resume) every N "
                                            "steps (0: only at the end). It is also saved when training is "
                                            "cancelled or fails.", min=0, max=1_000_000)
    checkpoints_total_limit: int = setting(0, LOGGING, "Each periodic save also keeps a numbered copy of the LoRA in "
                                                       "the run folder's checkpoints/ (<name>-step000100.safetensors); "
                                                       "keep at most this many, oldest removed first (0: keep all).",
                                           min=0, max=100_000)
    tensorboard: bool = setting(True, LOGGING, "Log reward, held-out reward, loss, grad norm, lr and step time to "
                                               "TensorBoard in the run folder's logs/ (tensorboard --logdir <run>/logs).")
    log_frames_every: int = setting(100, LOGGING, "Also log the scored frames to TensorBoard every N steps (0: "
                                                  "never).", min=0, max=1_000_000)

    def validate(self) -> "TrainConfig":
        from ..easyanimate.sampling import VideoSize

        VideoSize.of(self).check()
        VideoSize(self.validation_width, self.validation_height, self.validation_frames).check()
        for row in rows(TrainConfig):  # ranges and choices of the table, for the CLI and Python as for the node
            _check_row(row, getattr(self, row.name))
        if self.learning_rate <= 0 or self.adam_eps <= 0:
            raise ValueError("learning_rate and adam_eps must be > 0")
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
        has_list = bool(str(self.backprop_steps or "").strip())
        if has_list and self.backprop not in ("list", "auto"):
            raise ValueError(f"backprop_steps {self.backprop_steps!r} is given but backprop is {self.backprop!r}: "
                             "a step list is used only with backprop 'list' (or 'auto', which then means 'list'); "
                             "clear backprop_steps or choose 'list'")
        if self.backprop == "list" or has_list:
            parse_step_list(self.backprop_steps, self.sampling_steps)
        if self.loss_preset != "none" and self.max_reward is not None:
            raise ValueError(f"loss_preset {self.loss_preset!r} sets max_reward and loss_scale itself: clear "
                             f"max_reward ({self.max_reward:g}) or choose loss_preset 'none'")
        if self.lr_warmup_steps > self.train_steps:
            raise ValueError(f"lr_warmup_steps {self.lr_warmup_steps} exceeds train_steps {self.train_steps}")
        from ..easyanimate.step_cache import SpeedSettings

        SpeedSettings(self.teacache, self.teacache_threshold, self.cfg_skip_ratio).validate()
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def _check_row(row, value) -> None:
    """A value against its row of the settings table: type, finiteness, range, choices."""
    spec, name = row.spec, row.name
    if value is None:
        if spec.optional_number:
            return
        raise ValueError(f"{name} must be set")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if spec.choices and value not in spec.choices:
        raise ValueError(f"{name} must be one of {', '.join(spec.choices)}, got {value!r}")
    if row.kind in (int, float) and not isinstance(value, bool):
        if spec.min is not None and value < spec.min:
            raise ValueError(f"{name} must be at least {spec.min:g}, got {value}")
        if spec.max is not None and value > spec.max:
            raise ValueError(f"{name} must be at most {spec.max:g}, got {value}")


@dataclass
class PromptSources:
    """The held-out and validation prompts: lines or a file name in ComfyUI's input folder on the
    node, a file path on the CLI (.txt a prompt a line, .jsonl with a "prompt" key)."""

    eval_prompts: str = setting("", EVALUATION, "Held-out prompts scored without gradients on fixed seeds every "
                                                "eval_every steps. Training reward rising while held-out stalls = "
                                                "reward hacking.", multiline=True, prompts=True)
    validation_prompts: str = setting("", EVALUATION, "Prompts of the validation videos (a few: each one is a full "
                                                      "video at the validation settings). Empty: the first 4 "
                                                      "held-out prompts.", multiline=True, prompts=True)
