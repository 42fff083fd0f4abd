"""Reward backpropagation: train a LoRA on the EasyAnimate transformer so that sampled videos
score higher under a differentiable reward.

One optimizer step = `grad_accumulation` rollouts of `batch_size` prompts each: sample from noise
with the pack's sampler (gradients only on the chosen steps), decode the first latents, score
evenly spaced frames, loss = -reward (or |reward - max_reward|), backprop into the LoRA only,
clip, AdamW (fp16 models: with a GradScaler, so an overflowing step is skipped, not fatal).
Checkpoints in the official LoRA format every `save_every` steps and at the end (plus numbered ones
in checkpoints/, at most `checkpoints_total_limit`); the training state (AdamW, float32 masters,
GradScaler) and run.json go to the run folder, so a resumed run continues exactly where the saved
one was; with held-out prompts, `<run>.best.safetensors` keeps the LoRA of the best held-out
evaluation so far. The learning rate follows lr_schedule.py; TensorBoard logs and plot.png:
run_log.py; validation videos: validation.py; image-to-video prompts: prompts.py. Where each file
lives and the rule that a run only replaces its own files: run_layout.py.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..easyanimate.cancel import check_cancel
from ..easyanimate.model import EasyAnimateModel
from ..easyanimate.preflight import check_training
from ..easyanimate.sampling import is_flow_matching, sync_loras
from .checkpoint import (
    SCALER_PREFIX,
    TrainingState,
    load_checkpoint,
    new_history,
    optimizer_tensors,
    read_training_state,
    restore_optimizer_state,
    run_record,
    save_checkpoint,
    save_lora,
    save_numbered_checkpoint,
    split_scaler_state,
    write_run_record,
)
from .config import TrainConfig, resolve_strategy, select_grad_steps
from .distributed import SINGLE_PROCESS, DataParallel, critical
from .guards import GUARD_STATE_KEY, TrainingGuards
from .lora_layers import LoraLayers
from .loss_presets import loss_settings
from .lr_schedule import base_learning_rate, current_learning_rate, make_lr_scheduler
from .memory_options import activation_offload, after_restore, make_optimizer
from .prompts import TrainingPrompt, load_start_image
from .run_layout import RunLayout, claim_run, file_run_id, new_run_id, read_run_record
from .rollout import (
    PromptBank,
    RolloutSettings,
    enable_gradient_checkpointing,
    frame_rewards,
    hold_on_device,
    make_autograd_safe,
    reward_loss,
    rollout_video,
)
from .run_log import RunLog, save_png
from .validation import DEFAULT_VALIDATION_VIDEOS, ValidationVideos

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 1_000_000_007  # held-out videos use fixed seeds, apart from the training ones
# fp16: consecutive optimizer steps skipped for inf/NaN gradients before the run counts as diverged
# (the GradScaler halves its scale at each, so 2**-24 of the start scale by then).
MAX_SKIPPED_STEPS = 24


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient became NaN/inf; training stopped. The message names the kept file."""


class _NonFinite(Exception):
    pass


@dataclass
class StepReport:
    step: int
    total: int
    loss: float
    reward: float
    grad_norm: float
    seconds: float
    eval_reward: float | None = None
    lr: float | None = None
    validation_reward: float | None = None


@dataclass
class TrainResult:
    weights: object  # LoraWeights (float32, CPU) of the final LoRA
    state: TrainingState
    saved_path: Path | None
    stop_reason: str
    # The LoRA of the best held-out evaluation (`<run>.best.safetensors`); None without held-out
    # evaluation or without an output path. best_step / best_eval_reward say which evaluation it was.
    best_path: Path | None = None
    best_step: int | None = None
    best_eval_reward: float | None = None
    layout: RunLayout | None = None  # where this run's files are (the name may carry a counter suffix)


class RewardLoRATrainer:
    """Trains a LoRA on `model` (its existing LoRA stack stays applied underneath) to maximise `reward`.

    progress(done, total): called after each optimizer step (the node maps it to a progress bar; it
    may raise to cancel). check_interrupt(): called after each sampling step, may raise.
    on_step(StepReport): logging/preview. An exception from any of them stops training cleanly:
    the current (finite) LoRA is saved and the exception propagates. check_cancel() (easyanimate/
    cancel.py) is called before every rollout.

    Files: `layout` (run_layout.RunLayout), or `output_path` (+ `run_dir`) with the CLI's default
    layout. The run claims its files before any work (a fresh `<name>_NNN` when the name is taken,
    unless `resume_from` / `resume_layout` is this very run); `self.layout` is where they went.
    """

    def __init__(self, model: EasyAnimateModel, reward, prompts: Sequence[str | TrainingPrompt], config: TrainConfig,
                 output_path: str | os.PathLike | None = None, eval_prompts: Sequence[str] = (),
                 resume_from: str | os.PathLike | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 check_interrupt: Callable[[], None] | None = None,
                 on_step: Callable[[StepReport], None] | None = None,
                 save_dtype: torch.dtype = torch.bfloat16, extra_info: dict | None = None,
                 distributed: DataParallel | None = None,
                 run_dir: str | os.PathLike | None = None, layout: RunLayout | None = None,
                 resume_layout: RunLayout | None = None, validation_prompts: Sequence[str] = ()):
        if not prompts:
            raise ValueError("no training prompts: give at least one prompt")
        self.model = model
        self.pipe = model.pipe
        self.reward = reward
        items = [p if isinstance(p, TrainingPrompt) else TrainingPrompt(str(p)) for p in prompts]
        self.prompts = [p.text for p in items]
        # Image-to-video rollouts: the start image of each prompt (None: text-to-video).
        self.start_image_files = [p.image if config.start_images else None for p in items]
        self._start_images: dict = {}
        self.eval_prompts = list(eval_prompts)
        self.config = config.validate()
        self.max_reward, self.loss_scale = loss_settings(config, reward)  # refuses a preset that does not fit
        # Validation videos: their own prompts, else the first few held-out ones.
        self.validation = ValidationVideos(config, list(validation_prompts) or self.eval_prompts[:DEFAULT_VALIDATION_VIDEOS])
        if config.validation_every > 0 and not self.validation.prompts:
            raise ValueError("validation_every is set but there are no validation prompts (and no held-out prompts "
                             "to take them from)")
        if layout is None and output_path is not None:
            layout = RunLayout.for_lora_file(output_path, run_dir)
        if resume_layout is None and resume_from:
            same = layout is not None and os.path.abspath(resume_from) == os.path.abspath(layout.lora)
            resume_layout = layout if same else RunLayout.for_lora_file(resume_from)
        self.requested_layout = layout  # claimed (maybe under another name) when training starts
        self.layout: RunLayout | None = None
        self.resume_layout = resume_layout
        self.run_id = new_run_id()
        self.continuing = False  # True when resuming this very run into its own files
        self.progress, self.check_interrupt, self.on_step = progress, check_interrupt, on_step
        self.save_dtype = save_dtype
        self.extra_info = dict(extra_info or {})
        self.dist = distributed or SINGLE_PROCESS  # ranks: own prompts/seeds, averaged grads, rank 0 writes
        self.settings = RolloutSettings.from_config(config)
        self.guards = TrainingGuards(self)  # motion guards, preserve term, reward-normalisation state
        self.settings = self.guards.rollout_settings(self.settings)
        self.eval_settings = self.guards.eval_settings(self.settings)
        self._last_eval_motion: float | None = None
        self.strategy = resolve_strategy(config.backprop, is_flow_matching(self.pipe), config.backprop_steps)
        self.state = TrainingState(config=config.to_dict())
        self.lora: LoraLayers | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.lr_scheduler = None
        self._used_lr = float(config.learning_rate)
        self.run_log: RunLog | None = None
        self.saved_path: Path | None = None
        self.best_path: Path | None = None
        self._orders: dict[int, list[int]] = {}
        self._start_step = 0
        self._skipped_in_a_row = 0

    @property
    def output_path(self) -> Path | None:
        """The LoRA file this run writes (after the claim: the name it got)."""
        layout = self.layout or self.requested_layout
        return None if layout is None else layout.lora

    @property
    def resume_from(self) -> Path | None:
        return None if self.resume_layout is None else self.resume_layout.lora

    # -- setup ---------------------------------------------------------------------------------

    def _build_lora(self) -> None:
        transformer, device = self.pipe.transformer, self.pipe.compute_device
        cfg = self.config
        if self.resume_layout is not None:
            weights, state = load_checkpoint(self.resume_layout, transformer)
            self.lora = LoraLayers.from_weights(transformer, weights, device=device)
            if (self.lora.rank, self.lora.alpha) != (cfg.rank, cfg.alpha):
                log.info("resuming %s: rank %d / alpha %g come from the file (settings said %d / %g)",
                         self.resume_from, self.lora.rank, self.lora.alpha, cfg.rank, cfg.alpha)
            state.config = cfg.to_dict()
            state.config.update(rank=self.lora.rank, alpha=self.lora.alpha)
            self.state = state
            log.info("resumed from %s at step %d", self.resume_from, state.step)
        else:
            self.lora = LoraLayers(transformer, cfg.rank, cfg.alpha, cfg.target_modules, seed=cfg.seed, device=device)
        self.optimizer = make_optimizer(cfg, self.lora.parameters(), base_learning_rate(cfg, self.dist.world_size))
        # fp16 activations underflow in backward without loss scaling; bf16/fp32 need none.
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=self.pipe.dtype == torch.float16)
        self._start_step = self.state.step
        if self.resume_layout is not None:
            self._restore_optimizer(weights)
        self.lr_scheduler = make_lr_scheduler(cfg, self.optimizer, self.state.step)  # resumes continue the schedule

    def _restore_optimizer(self, weights) -> None:
        """AdamW moments, float32 master weights and the GradScaler from the resumed run's state
        file; when it is missing or does not fit, warn and start with fresh moments."""
        source = self.resume_layout.state
        fresh = "AdamW's moment estimates restart, so the run will not match an uninterrupted one"
        try:
            loaded = read_training_state(self.resume_layout)
        except ValueError as e:
            log.warning("%s; %s", e, fresh)
            return
        if loaded is None:
            log.warning("resuming %s without training state (no %s): %s", self.resume_from, source, fresh)
            return
        tensors, step, run_id = loaded
        lora_run = weights.metadata.get("easyanimate_reward_run_id")
        if step != self.state.step or (lora_run is not None and run_id != lora_run):
            log.warning("ignoring %s: it was saved at step %d (run %s), the LoRA at step %d (run %s); %s",
                        source, step, run_id, self.state.step, lora_run, fresh)
            return
        factors, scaler = split_scaler_state(tensors)
        problem = restore_optimizer_state(self.lora.named_factors(), self.optimizer, factors, weights)
        if problem is not None:
            log.warning("ignoring %s: %s; %s", source, problem, fresh)
            return
        if scaler and self.scaler.is_enabled():
            state = self.scaler.state_dict()
            state.update(scale=float(scaler["scale"]), _growth_tracker=int(scaler["growth_tracker"]))
            self.scaler.load_state_dict(state)
        after_restore(self.optimizer)
        log.info("restored AdamW state and float32 weights from %s", source)

    def _claim_files(self) -> None:
        """Before any work: the run's file names (a fresh one when taken) and that each can be written.
        Only rank 0 writes, so only rank 0 claims: the other ranks keep no layout."""
        if self.requested_layout is None or not self.dist.is_main:
            return
        resumed = self.resume_layout
        self.layout, run_id, self.continuing = claim_run(self.requested_layout, resumed)
        if self.continuing:
            self.run_id = run_id
            self.saved_path = self.layout.lora  # the file resumed from is the last good checkpoint so far
            best = self.layout.best
            if self.state.best_step is not None and best.is_file() and file_run_id(best) == run_id:
                self.best_path = best
        else:
            if self.layout != self.requested_layout:
                log.warning("%s (or its .best / run folder) already exists and is not this run's: this run is "
                            "saved as %s", self.requested_layout.lora, self.layout.lora)
            # A new run's best is its own: held-out results of a run it started from stay in the history.
            state = self.state
            state.best_eval = state.best_step = state.best_eval_reward = None
            state.evals_without_improvement = 0
            state.stop_reason = "running"
            write_run_record(self.layout, run_record(self.layout, state, self.run_id, self._extra()))

    def _freeze_frozen_parts(self) -> None:
        pipe = self.pipe
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, self.reward):
            if module is not None:
                module.requires_grad_(False)
        self.reward.eval()
        for module in (pipe.transformer, pipe.vae, self.reward):
            replaced = make_autograd_safe(module)
            if replaced:
                log.info("%s: copied %d inference-mode tensors so autograd can use them",
                         type(module).__name__, replaced)

    # -- data ----------------------------------------------------------------------------------

    def _prompt_at(self, index: int) -> str:
        return self.prompts[self._prompt_index(index)]

    def _prompt_index(self, index: int) -> int:
        """Prompts in a new seeded shuffle every epoch (deterministic, so resumes continue it)."""
        count = len(self.prompts)
        epoch = index // count
        order = self._orders.get(epoch)
        if order is None:
            order = list(range(count))
            random.Random(self.config.seed * 7919 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return order[index % count]

    def _micro_batch(self, step: int, micro: int) -> tuple[list[str], list[int], list]:
        """Prompts, seeds and start images (None: text-to-video) of one rollout of this rank."""
        cfg = self.config
        first = self.dist.first_of_rank((step * cfg.grad_accumulation + micro) * cfg.batch_size * self.dist.world_size,
                                        cfg.batch_size)
        indices = [self._prompt_index(first + i) for i in range(cfg.batch_size)]
        seeds = [cfg.seed + first + i for i in range(cfg.batch_size)]
        return [self.prompts[i] for i in indices], seeds, [self._start_image(i) for i in indices]

    def _start_image(self, index: int):
        path = self.start_image_files[index]
        return None if path is None else self._start_images[path]  # loaded by _check_start_images

    def _check_start_images(self) -> None:
        """Before any work: start images need an InP model, and every image must be readable."""
        from ..easyanimate import conditioning

        named = [p for p in self.start_image_files if p is not None]
        if not named:
            return
        inputs = conditioning.model_inputs(self.pipe)
        if inputs.kind != conditioning.INPAINT:
            raise ValueError(f"{len(named)} training prompts name a start image ({named[0].name}, ...), but this is a "
                             f"{inputs.describe()}: image-to-video rollouts need an InP model. Remove the images "
                             "from the prompt lines or turn start_images off.")
        for path in dict.fromkeys(named):
            self._start_images[path] = load_start_image(path)

    def grad_steps_for(self, step: int, micro: int) -> Callable[[int], list[int]]:
        cfg = self.config
        rng = random.Random((cfg.seed * 1_000_003 + step) * 131 + micro)
        return lambda total: select_grad_steps(self.strategy, total, cfg.backprop_k, cfg.backprop_start,
                                               cfg.backprop_end, cfg.backprop_steps, rng)

    def _sampling_callback(self):
        if self.check_interrupt is None:
            return None
        check = self.check_interrupt
        return lambda done, total, latents: check()

    # -- steps ---------------------------------------------------------------------------------

    def _train_step(self, pipe, bank: PromptBank, step: int) -> tuple[float, float, float]:
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        rewards, losses = [], []
        for micro in range(cfg.grad_accumulation):
            check_cancel()
            prompts, seeds, images = self._micro_batch(step, micro)
            uncond = bank.uncond(len(prompts)) if cfg.cfg > 1 else None
            with activation_offload(cfg, pipe.compute_device):
                video = rollout_video(pipe, self.settings, bank.cond(prompts), uncond, seeds,
                                      self.grad_steps_for(step, micro), cfg.drtune, self._sampling_callback(),
                                      start_images=images)
                if micro == 0 and self.run_log.wants_frames(step + 1):
                    self.run_log.frames(step + 1, video)
                with self.guards.updating_statistics():
                    scores = frame_rewards(self.reward, video, prompts, self.settings.num_sampled_frames)
                loss = reward_loss(scores, self.max_reward, self.loss_scale)
                if cfg.preserve != "none":  # the base model's rollout on the same noise and prompts
                    base = self.guards.base_rollout(lambda: rollout_video(
                        pipe, self.settings, bank.cond(prompts), uncond, seeds, (),
                        step_callback=self._sampling_callback(), start_images=images))
                    loss = loss + self.guards.preserve_loss(video, base)
            if not torch.isfinite(loss) and not self.dist.active:  # ranks: all stop after the reduction
                raise _NonFinite(f"the loss is {loss.item()} at step {step + 1}")
            self.scaler.scale(loss / cfg.grad_accumulation).backward()
            rewards.append(scores.detach().mean().item())
            losses.append(loss.detach().item())
            del video, scores, loss
        reward, loss = self.dist.average_gradients(self.lora.parameters(), sum(rewards) / len(rewards),
                                                   sum(losses) / len(losses))
        if not math.isfinite(loss):
            raise _NonFinite(f"the loss is {loss} at step {step + 1}")
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.lora.parameters() if p.grad is not None]
        limit = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit)) if params else 0.0
        if not math.isfinite(grad_norm):
            if not self.scaler.is_enabled():
                raise _NonFinite(f"the gradient norm is {grad_norm} at step {step + 1}")
            self._skipped_in_a_row += 1
            if self._skipped_in_a_row > MAX_SKIPPED_STEPS:
                raise _NonFinite(f"the gradient was inf/NaN in {self._skipped_in_a_row} fp16 steps in a row "
                                 f"(loss scale now {self.scaler.get_scale():g}) at step {step + 1}")
            log.warning("step %d: inf/NaN gradient in fp16; the update is skipped and the loss scale lowered "
                        "from %g", step + 1, self.scaler.get_scale())
        else:
            self._skipped_in_a_row = 0
        self._used_lr = current_learning_rate(self.optimizer)
        with critical():  # a stop signal waits for the whole update
            self.scaler.step(self.optimizer)  # without fp16 (scaler disabled): a plain optimizer.step()
            self.scaler.update()
            with warnings.catch_warnings():  # a skipped fp16 step still advances the schedule, on purpose
                warnings.simplefilter("ignore", UserWarning)
                self.lr_scheduler.step()  # the rate of the next step
        return reward, loss, grad_norm

    @torch.no_grad()
    def evaluate(self, pipe, bank: PromptBank, prompts: Sequence[str] | None = None) -> tuple[float, float]:
        """Mean reward and loss on the held-out prompts: same rollout, no graph, fixed seeds."""
        cfg = self.config
        prompts = list(self.eval_prompts if prompts is None else prompts)
        scores, motions, mine = [], [], self.dist.shard(len(prompts))  # ranks: prompt i on rank i mod N
        for start in range(0, len(mine), cfg.batch_size):
            check_cancel()
            batch = [prompts[i] for i in mine[start:start + cfg.batch_size]]
            seeds = [cfg.seed + EVAL_SEED_OFFSET + i for i in mine[start:start + cfg.batch_size]]
            uncond = bank.uncond(len(batch)) if cfg.cfg > 1 else None
            video = rollout_video(pipe, self.eval_settings, bank.cond(batch), uncond, seeds, (),
                                  step_callback=self._sampling_callback())
            scores.append(frame_rewards(self.reward, self.guards.reward_frames(video), batch,
                                        self.settings.num_sampled_frames))
            motions.append(self.guards.eval_motion(video))
        scores = self.dist.gather_rows(mine, scores, len(prompts))  # every rank gets all rows, in order
        motion_rows = [m for m in motions if m is not None]
        if self.guards.measures_motion and len(motion_rows) == len(motions):
            gathered = self.dist.gather_rows(mine, motion_rows, len(prompts))
            self._last_eval_motion = None if gathered is None else gathered.mean().item()
        else:
            self._last_eval_motion = None
        return scores.mean().item(), reward_loss(scores, self.max_reward, self.loss_scale).item()

    def _record_eval(self, pipe, bank: PromptBank) -> tuple[float, bool]:
        """Evaluate, record (a new best is saved as `<name>.best.safetensors`), and say whether
        early stopping triggers. Best = lowest held-out loss, i.e. highest held-out reward (closest
        to max_reward when that is set), the same criterion as early stopping."""
        reward, loss = self.evaluate(pipe, bank)
        history, state = self.state.history, self.state
        history["eval_step"].append(state.step)
        history["eval_reward"].append(reward)
        history["eval_loss"].append(loss)
        self.run_log.scalar("held_out/reward", reward, state.step)
        self.run_log.scalar("held_out/loss", loss, state.step)
        if math.isfinite(loss) and (state.best_eval is None or loss < state.best_eval):
            state.best_eval, state.evals_without_improvement = loss, 0
            state.best_step, state.best_eval_reward = state.step, reward
            self._save_best()
        else:
            state.evals_without_improvement += 1
        log.info("held-out at step %d: reward %.5g (loss %.5g, %d evaluations without improvement)",
                 state.step, reward, loss, state.evals_without_improvement)
        motion_stop = self.guards.record_eval(reward, self._last_eval_motion)
        patience = self.config.early_stop_patience
        return reward, bool(patience and state.evals_without_improvement >= patience) or motion_stop

    def _validate(self, pipe, step: int) -> float | None:
        """Validation videos when due (shared by the ranks, written by rank 0): saved, scored, recorded."""
        if not self.validation.due(step, self.config.train_steps):
            return None
        reward = self.validation.run(pipe, self.reward, step, self.layout, self.dist, self._sampling_callback())
        self.state.history["validation_step"].append(step)
        self.state.history["validation_reward"].append(reward)
        self.run_log.scalar("validation/reward", reward, step)
        return reward

    # -- checkpoints ---------------------------------------------------------------------------

    def _extra(self) -> dict:
        layout = self.layout
        files = {}
        if layout is not None:
            files = {"lora": self.saved_path, "best": self.best_path, "run_record": layout.run_json,
                     "training_state": layout.state if layout.state.is_file() else None}
        return dict(self.extra_info, backprop_strategy=self.strategy, base_model=self.pipe.folder,
                    base_version=self.pipe.version, base_loras=[a.name for a in self.model.loras],
                    run_name=layout.name if layout is not None else None,
                    best_file=self.best_path.name if self.best_path is not None else None,
                    files={k: str(v) for k, v in files.items() if v is not None},
                    **{GUARD_STATE_KEY: self.guards.extra_state()})

    def _optimizer_state(self) -> dict[str, torch.Tensor]:
        tensors = optimizer_tensors(self.lora.named_factors(), self.optimizer)
        if self.scaler is not None and self.scaler.is_enabled():
            tensors[SCALER_PREFIX + "scale"] = torch.tensor(float(self.scaler.get_scale()))
            tensors[SCALER_PREFIX + "growth_tracker"] = torch.tensor(int(self.scaler.state_dict()["_growth_tracker"]))
        return tensors

    def save(self, stop_reason: str = "") -> Path | None:
        """The LoRA, the training state (for an exact resume) and run.json of this run (rank 0 only)."""
        if self.layout is None or not self.dist.is_main:
            return None
        self.state.stop_reason = stop_reason
        self.saved_path = self.layout.lora  # listed in run.json as this run's
        with critical():  # a stop signal waits until the files are complete
            weights = self.lora.to_weights()
            save_checkpoint(self.layout, weights, self.state, self.run_id, self._extra(),
                            self.save_dtype, optimizer_state=self._optimizer_state())
            if stop_reason == "periodic":  # numbered copies of the periodic saves, as the official checkpoints
                save_numbered_checkpoint(self.layout, weights, self.state, self.run_id, self.save_dtype,
                                         self.config.checkpoints_total_limit)
            save_png(self.layout.plot, history_plot(self.state.history))
        return self.saved_path

    def _save_best(self) -> None:
        """The current LoRA as the best held-out one (a plain LoRA for use; run.json says which step)."""
        if self.layout is None or not self.dist.is_main:
            return
        target = self.layout.best
        marks = {"easyanimate_reward_best_step": str(self.state.step),
                 "easyanimate_reward_best_of": self.layout.lora.name}
        save_lora(target, self.lora.to_weights(), self.state, self.run_id, self.save_dtype, marks)
        self.best_path = target
        write_run_record(self.layout, run_record(self.layout, self.state, self.run_id, self._extra()))
        log.info("new best held-out reward %.5g at step %d: saved %s", self.state.best_eval_reward,
                 self.state.step, target)

    def _result(self, stop_reason: str) -> TrainResult:
        return TrainResult(self.lora.to_weights(), self.state, self.saved_path, stop_reason, self.best_path,
                           self.state.best_step, self.state.best_eval_reward, self.layout)

    def _save_last_good(self, reason: str) -> Path | None:
        """On a stop: save the current LoRA if it is finite and trained since the start, else keep the
        last file as it is (a run stopped before its first update writes over nothing)."""
        if self.layout is None or self.lora is None:
            return None
        if self.state.step == self._start_step:
            if not self.continuing:  # a record of why the new run stopped, in its own folder
                self.state.stop_reason = reason
                write_run_record(self.layout, run_record(self.layout, self.state, self.run_id, self._extra()))
            return self.saved_path
        if not self.lora.all_finite():
            log.error("LoRA weights are not finite; keeping the last good checkpoint %s", self.saved_path)
            return self.saved_path
        try:
            return self.save(reason)
        except Exception:  # never hide the reason training stopped behind a failed save
            log.exception("could not save the LoRA after: %s", reason)
            return self.saved_path

    # -- the loop ------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        # Hosts may call this under torch.inference_mode() (ComfyUI runs every node so).
        with torch.inference_mode(False), torch.enable_grad():
            return self._train()

    def _train(self) -> TrainResult:
        cfg = self.config
        self._prepare()
        if self.state.step >= cfg.train_steps:
            log.info("nothing to train: already at step %d of %d", self.state.step, cfg.train_steps)
            self.save("already done")
            self.run_log.close()
            return self._result("already done")
        bank = PromptBank(self.pipe, self.prompts + self.eval_prompts, cfg.negative_prompt)
        restore_checkpointing = enable_gradient_checkpointing(self.pipe) if cfg.gradient_checkpointing else (lambda: None)
        self.lora.attach(self.pipe.transformer)
        try:
            self.validation.prepare(self.pipe)  # every rank samples its share of the validation videos
            with hold_on_device(self.pipe) as pipe:
                stop_reason = self._loop(pipe, bank)
        except _NonFinite as e:
            saved = self._save_last_good(f"stopped: {e}")
            where = f"the last good LoRA is in {saved}" if saved else "no LoRA file was written"
            raise TrainingDivergedError(f"reward training stopped: {e}; {where}. Lower the learning rate, "
                                        "check the reward, or use fp32/bf16 instead of fp16.") from None
        except BaseException as e:
            saved = self._save_last_good(f"interrupted ({type(e).__name__})")
            log.warning("reward training stopped at step %d by %s; LoRA kept in %s", self.state.step,
                        type(e).__name__, saved)
            raise
        finally:
            self.lora.detach()
            restore_checkpointing()
            bank.store.close()
            self.validation.close()
            self.run_log.close()
        self.save(stop_reason)
        return self._result(stop_reason)

    def _prepare(self) -> None:
        """Everything before the first rollout: refusals, frozen parts, the LoRA, the run's files."""
        check_training(self.pipe, self.config, self.reward)  # refuse before allocating (easyanimate/preflight.py)
        self._check_start_images()
        self._freeze_frozen_parts()
        sync_loras(self.model)  # LoRAs already on the wire stay applied under the one being trained
        self._build_lora()
        self._claim_files()
        self.run_log = RunLog(self.layout, self.config, self.dist.is_main)
        self.guards.reset()  # reward-normalisation statistics never leak from an earlier run
        if self.resume_layout is not None:
            self.guards.restore(read_run_record(self.resume_layout))

    def _loop(self, pipe, bank: PromptBank) -> str:
        """Optimizer steps until the end or a stop rule; returns why it stopped."""
        cfg = self.config
        evaluating = cfg.eval_every > 0 and bool(self.eval_prompts)
        if evaluating:
            self.guards.prepare_base(pipe, bank)  # the base model's held-out motion, once per run
        if evaluating and not self.state.history["eval_step"]:
            self._record_eval(pipe, bank)  # baseline before any update
        if self.progress is not None:
            self.progress(self.state.step, cfg.train_steps)
        while self.state.step < cfg.train_steps:
            check_cancel()
            started = time.perf_counter()
            reward, loss, grad_norm = self._train_step(pipe, bank, self.state.step)
            report = self._record_step(reward, loss, grad_norm, time.perf_counter() - started)
            early_stop = False
            if evaluating and report.step % cfg.eval_every == 0:
                report.eval_reward, early_stop = self._record_eval(pipe, bank)
            report.validation_reward = self._validate(pipe, report.step)
            if cfg.save_every and report.step % cfg.save_every == 0 and report.step < cfg.train_steps:
                self.save("periodic")
            if self.on_step is not None:
                self.on_step(report)
            if self.progress is not None:
                self.progress(report.step, cfg.train_steps)
            if early_stop:
                return self._early_stop_reason(report.step)
        return "finished"

    def _record_step(self, reward: float, loss: float, grad_norm: float, seconds: float) -> StepReport:
        self.state.step += 1
        step, history, lr = self.state.step, self.state.history, self._used_lr
        for key, value in (("step", step), ("reward", reward), ("loss", loss), ("grad_norm", grad_norm), ("lr", lr)):
            history[key].append(value)
        self.run_log.step(step, reward, loss, grad_norm, lr, seconds)
        log.info("step %d/%d: reward %.5g loss %.5g grad norm %.3g lr %.3g (%.2f s)", step, self.config.train_steps,
                 reward, loss, grad_norm, lr, seconds)
        return StepReport(step, self.config.train_steps, loss, reward, grad_norm, seconds, lr=lr)

    def _early_stop_reason(self, step: int) -> str:
        if self.guards.stop_reason:
            return self.guards.stop_reason
        log.info("early stop at step %d: held-out reward did not improve in %d evaluations; the best was at step %s "
                 "(held-out reward %s), kept in %s", step, self.config.early_stop_patience, self.state.best_step,
                 self.state.best_eval_reward, self.best_path)
        return "early stop"


def history_plot(history: dict, width: int = 640, height: int = 300) -> torch.Tensor:
    """Reward (training + held-out) above loss, per step: (1, 2 * height, width, 3) in [0, 1].
    Index = optimizer step; step 0 is the held-out baseline before training."""
    from ..reward.plot import plot_series

    last = max(history["step"][-1:] + history["eval_step"][-1:] + [0])
    nan = float("nan")

    def along_steps(steps, values):
        series = [nan] * (last + 1)
        for s, v in zip(steps, values):
            series[s] = nan if v is None else float(v)
        return series

    rewards = {"training reward": along_steps(history["step"], history["reward"])}
    losses = {"training loss": along_steps(history["step"], history["loss"])}
    if history["eval_step"]:
        rewards["held-out reward"] = along_steps(history["eval_step"], history["eval_reward"])
        losses["held-out loss"] = along_steps(history["eval_step"], history.get("eval_loss", []))
    top = plot_series(rewards, "reward per step", "step", "reward", width, height)
    bottom = plot_series(losses, "loss per step", "step", "loss", width, height)
    panels = [top, bottom]
    motion = [m for m in history.get("eval_motion", []) if m is not None]
    if history["eval_step"] and motion:
        change = [c for c in history.get("eval_motion_change", []) if c is not None]
        title = "held-out motion (px/frame)" + (f", last {change[-1]:+.1f}% vs base" if change else "")
        series = {"held-out motion": along_steps(history["eval_step"], history.get("eval_motion", []))}
        panels.append(plot_series(series, title, "step", "motion", width, height))
    return torch.cat(panels, dim=1)


__all__ = ["RewardLoRATrainer", "TrainConfig", "TrainResult", "StepReport", "TrainingDivergedError",
           "history_plot", "new_history"]
