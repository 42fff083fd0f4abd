"""Reward backpropagation: train a LoRA on the EasyAnimate transformer so that sampled videos
score higher under a differentiable reward.

One optimizer step = `grad_accumulation` rollouts of `batch_size` prompts each: sample from noise
with the pack's sampler (gradients only on the chosen steps), decode the first latents, score
evenly spaced frames, loss = -reward (or |reward - max_reward|), backprop into the LoRA only,
clip, AdamW. Checkpoints in the official LoRA format every `save_every` steps and at the end,
each with its optimizer state beside it (`<name>.optimizer.safetensors`), so a resumed run continues
exactly where the saved one was; with held-out prompts, `<name>.best.safetensors` keeps the LoRA of
the best held-out evaluation so far.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..easyanimate.model import EasyAnimateModel
from ..easyanimate.preflight import check_training
from ..easyanimate.sampling import is_flow_matching, sync_loras
from .checkpoint import (
    TrainingState,
    best_path,
    load_checkpoint,
    new_history,
    optimizer_path,
    optimizer_tensors,
    read_optimizer_state,
    read_sidecar,
    restore_optimizer_state,
    save_checkpoint,
)
from .config import TrainConfig, resolve_strategy, select_grad_steps
from .lora_layers import LoraLayers
from .memory_options import activation_offload, after_restore, make_optimizer
from .rollout import (
    PromptBank,
    RolloutSettings,
    enable_gradient_checkpointing,
    hold_on_device,
    make_autograd_safe,
    reward_loss,
    rollout_video,
    video_rewards,
)

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 1_000_000_007  # held-out videos use fixed seeds, apart from the training ones


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


@dataclass
class TrainResult:
    weights: object  # LoraWeights (float32, CPU) of the final LoRA
    state: TrainingState
    saved_path: Path | None
    stop_reason: str
    # The LoRA of the best held-out evaluation (`<name>.best.safetensors`); None without held-out
    # evaluation or without an output path. best_step / best_eval_reward say which evaluation it was.
    best_path: Path | None = None
    best_step: int | None = None
    best_eval_reward: float | None = None


class RewardLoRATrainer:
    """Trains a LoRA on `model` (its existing LoRA stack stays applied underneath) to maximise `reward`.

    progress(done, total): called after each optimizer step (the node maps it to a progress bar; it
    may raise to cancel). check_interrupt(): called after each sampling step, may raise.
    on_step(StepReport): logging/preview. An exception from any of them stops training cleanly:
    the current (finite) LoRA is saved to `output_path` and the exception propagates.
    """

    def __init__(self, model: EasyAnimateModel, reward, prompts: Sequence[str], config: TrainConfig,
                 output_path: str | os.PathLike | None = None, eval_prompts: Sequence[str] = (),
                 resume_from: str | os.PathLike | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 check_interrupt: Callable[[], None] | None = None,
                 on_step: Callable[[StepReport], None] | None = None,
                 save_dtype: torch.dtype = torch.bfloat16, extra_info: dict | None = None):
        if not prompts:
            raise ValueError("no training prompts: give at least one prompt")
        self.model = model
        self.pipe = model.pipe
        self.reward = reward
        self.prompts = list(prompts)
        self.eval_prompts = list(eval_prompts)
        self.config = config.validate()
        self.output_path = Path(output_path) if output_path is not None else None
        self.resume_from = Path(resume_from) if resume_from else None
        self.progress, self.check_interrupt, self.on_step = progress, check_interrupt, on_step
        self.save_dtype = save_dtype
        self.extra_info = dict(extra_info or {})
        self.settings = RolloutSettings.from_config(config)
        self.strategy = resolve_strategy(config.backprop, is_flow_matching(self.pipe))
        self.state = TrainingState(config=config.to_dict())
        self.lora: LoraLayers | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.saved_path: Path | None = None
        self.best_path: Path | None = None
        self._orders: dict[int, list[int]] = {}

    # -- setup ---------------------------------------------------------------------------------

    def _build_lora(self) -> None:
        transformer, device = self.pipe.transformer, self.pipe.compute_device
        cfg = self.config
        if self.resume_from is not None:
            weights, state = load_checkpoint(self.resume_from, transformer)
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
        self.optimizer = make_optimizer(cfg, self.lora.parameters())
        if self.resume_from is not None:
            self._restore_optimizer(weights)
            self._find_best_file()

    def _restore_optimizer(self, weights) -> None:
        """AdamW moments and float32 master weights from the optimizer file beside the resumed
        LoRA; when it is missing or does not fit, warn and start with fresh moments."""
        source = optimizer_path(self.resume_from)
        fresh = "AdamW's moment estimates restart, so the run will not match an uninterrupted one"
        try:
            loaded = read_optimizer_state(self.resume_from)
        except ValueError as e:
            log.warning("%s; %s", e, fresh)
            return
        if loaded is None:
            log.warning("resuming %s without optimizer state (no %s): %s", self.resume_from, source.name, fresh)
            return
        tensors, step = loaded
        if step != self.state.step:
            log.warning("ignoring %s: it was saved at step %d, the LoRA at step %d; %s",
                        source, step, self.state.step, fresh)
            return
        problem = restore_optimizer_state(self.lora.named_factors(), self.optimizer, tensors, weights)
        if problem is not None:
            log.warning("ignoring %s: %s; %s", source, problem, fresh)
            return
        after_restore(self.optimizer)
        log.info("restored AdamW state and float32 weights from %s", source)

    def _find_best_file(self) -> None:
        """The best-held-out file of the run resumed from, if it is the one its state names."""
        if self.state.best_step is None:
            return
        candidates = [best_path(self.resume_from)]
        if self.output_path is not None:
            candidates.append(best_path(self.output_path))
        for candidate in candidates:
            try:
                sidecar = read_sidecar(candidate) if candidate.is_file() else None
            except ValueError:  # a damaged sidecar: that file is not trusted as the best one
                sidecar = None
            if sidecar is not None and sidecar.get("best_step") == self.state.best_step:
                self.best_path = candidate
                return

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
        """Prompts in a new seeded shuffle every epoch (deterministic, so resumes continue it)."""
        count = len(self.prompts)
        epoch = index // count
        order = self._orders.get(epoch)
        if order is None:
            order = list(range(count))
            random.Random(self.config.seed * 7919 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self.prompts[order[index % count]]

    def _micro_batch(self, step: int, micro: int) -> tuple[list[str], list[int]]:
        cfg = self.config
        first = (step * cfg.grad_accumulation + micro) * cfg.batch_size
        prompts = [self._prompt_at(first + i) for i in range(cfg.batch_size)]
        seeds = [cfg.seed + first + i for i in range(cfg.batch_size)]
        return prompts, seeds

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
            prompts, seeds = self._micro_batch(step, micro)
            uncond = bank.uncond(len(prompts)) if cfg.guidance_scale > 1 else None
            with activation_offload(cfg, pipe.compute_device):
                video = rollout_video(pipe, self.settings, bank.cond(prompts), uncond, seeds,
                                      self.grad_steps_for(step, micro), cfg.detach_input, self._sampling_callback())
                scores = video_rewards(self.reward, video, prompts, cfg.num_sampled_frames)
                loss = reward_loss(scores, cfg.max_reward, cfg.loss_scale)
            if not torch.isfinite(loss):
                raise _NonFinite(f"the loss is {loss.item()} at step {step + 1}")
            (loss / cfg.grad_accumulation).backward()
            rewards.append(scores.detach().mean().item())
            losses.append(loss.detach().item())
            del video, scores, loss
        params = [p for p in self.lora.parameters() if p.grad is not None]
        limit = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit)) if params else 0.0
        if not math.isfinite(grad_norm):
            raise _NonFinite(f"the gradient norm is {grad_norm} at step {step + 1}")
        self.optimizer.step()
        return sum(rewards) / len(rewards), sum(losses) / len(losses), grad_norm

    @torch.no_grad()
    def evaluate(self, pipe, bank: PromptBank, prompts: Sequence[str] | None = None) -> tuple[float, float]:
        """Mean reward and loss on the held-out prompts: same rollout, no graph, fixed seeds."""
        cfg = self.config
        prompts = list(self.eval_prompts if prompts is None else prompts)
        scores = []
        for start in range(0, len(prompts), cfg.batch_size):
            batch = prompts[start:start + cfg.batch_size]
            seeds = [cfg.seed + EVAL_SEED_OFFSET + start + i for i in range(len(batch))]
            uncond = bank.uncond(len(batch)) if cfg.guidance_scale > 1 else None
            video = rollout_video(pipe, self.settings, bank.cond(batch), uncond, seeds, (),
                                  step_callback=self._sampling_callback())
            scores.append(video_rewards(self.reward, video, batch, cfg.num_sampled_frames))
        scores = torch.cat(scores)
        return scores.mean().item(), reward_loss(scores, cfg.max_reward, cfg.loss_scale).item()

    def _record_eval(self, pipe, bank: PromptBank) -> tuple[float, bool]:
        """Evaluate, record (a new best is saved as `<name>.best.safetensors`), and say whether
        early stopping triggers. Best = lowest held-out loss, i.e. highest held-out reward (closest
        to max_reward when that is set), the same criterion as early stopping."""
        reward, loss = self.evaluate(pipe, bank)
        history, state = self.state.history, self.state
        history["eval_step"].append(state.step)
        history["eval_reward"].append(reward)
        history["eval_loss"].append(loss)
        if math.isfinite(loss) and (state.best_eval is None or loss < state.best_eval):
            state.best_eval, state.evals_without_improvement = loss, 0
            state.best_step, state.best_eval_reward = state.step, reward
            self._save_best()
        else:
            state.evals_without_improvement += 1
        log.info("held-out at step %d: reward %.5g (loss %.5g, %d evaluations without improvement)",
                 state.step, reward, loss, state.evals_without_improvement)
        patience = self.config.early_stop_patience
        return reward, bool(patience and state.evals_without_improvement >= patience)

    # -- checkpoints ---------------------------------------------------------------------------

    def _extra(self) -> dict:
        return dict(self.extra_info, backprop_strategy=self.strategy, base_model=self.pipe.folder,
                    base_version=self.pipe.version, base_loras=[a.name for a in self.model.loras],
                    best_file=self.best_path.name if self.best_path is not None else None)

    def save(self, stop_reason: str = "") -> Path | None:
        """The LoRA, its sidecar and the optimizer state (for an exact resume) to `output_path`."""
        if self.output_path is None:
            return None
        self.state.stop_reason = stop_reason
        moments = optimizer_tensors(self.lora.named_factors(), self.optimizer) if self.optimizer is not None else None
        self.saved_path = save_checkpoint(self.output_path, self.lora.to_weights(), self.state, self._extra(),
                                          self.save_dtype, optimizer_state=moments)
        return self.saved_path

    def _save_best(self) -> None:
        """The current LoRA as the best held-out one (no optimizer state: it is for use, not resume)."""
        if self.output_path is None:
            return
        target = best_path(self.output_path)
        state = dataclasses.replace(self.state, stop_reason=f"best held-out evaluation so far (step {self.state.step})")
        extra = dict(self._extra(), best_file=target.name, best_of=self.output_path.name,
                     best_eval_loss=self.state.best_eval)
        self.best_path = save_checkpoint(target, self.lora.to_weights(), state, extra, self.save_dtype)
        log.info("new best held-out reward %.5g at step %d: saved %s", self.state.best_eval_reward,
                 self.state.step, target)

    def _result(self, stop_reason: str) -> TrainResult:
        return TrainResult(self.lora.to_weights(), self.state, self.saved_path, stop_reason, self.best_path,
                           self.state.best_step, self.state.best_eval_reward)

    def _save_last_good(self, reason: str) -> Path | None:
        """On a stop: save the current LoRA if it is finite, else keep the last file as it is."""
        if self.output_path is None or self.lora is None:
            return None
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
        check_training(self.pipe, cfg, self.reward)  # refuse before allocating (easyanimate/preflight.py)
        self._freeze_frozen_parts()
        sync_loras(self.model)  # LoRAs already on the wire stay applied under the one being trained
        self._build_lora()
        if self.output_path is not None and self.resume_from is not None \
                and self.output_path.resolve() == self.resume_from.resolve():
            self.saved_path = self.output_path  # the file resumed from is the last good checkpoint so far
        stop_reason = "finished"
        if self.state.step >= cfg.train_steps:
            log.info("nothing to train: already at step %d of %d", self.state.step, cfg.train_steps)
            self.save("already done")
            return self._result("already done")
        bank = PromptBank(self.pipe, self.prompts + self.eval_prompts, cfg.negative_prompt)
        restore_checkpointing = enable_gradient_checkpointing(self.pipe) if cfg.gradient_checkpointing else (lambda: None)
        self.lora.attach(self.pipe.transformer)
        try:
            with hold_on_device(self.pipe) as pipe:
                evaluating = cfg.eval_every > 0 and bool(self.eval_prompts)
                if evaluating and not self.state.history["eval_step"]:
                    self._record_eval(pipe, bank)  # baseline before any update
                if self.progress is not None:
                    self.progress(self.state.step, cfg.train_steps)
                while self.state.step < cfg.train_steps:
                    started = time.perf_counter()
                    reward, loss, grad_norm = self._train_step(pipe, bank, self.state.step)
                    self.state.step += 1
                    step = self.state.step
                    history = self.state.history
                    history["step"].append(step)
                    history["reward"].append(reward)
                    history["loss"].append(loss)
                    history["grad_norm"].append(grad_norm)
                    eval_reward, early_stop = None, False
                    if evaluating and step % cfg.eval_every == 0:
                        eval_reward, early_stop = self._record_eval(pipe, bank)
                    report = StepReport(step, cfg.train_steps, loss, reward, grad_norm,
                                        time.perf_counter() - started, eval_reward)
                    log.info("step %d/%d: reward %.5g loss %.5g grad norm %.3g (%.2f s)", step, cfg.train_steps,
                             reward, loss, grad_norm, report.seconds)
                    if cfg.save_every and step % cfg.save_every == 0 and step < cfg.train_steps:
                        self.save("periodic")
                    if self.on_step is not None:
                        self.on_step(report)
                    if self.progress is not None:
                        self.progress(step, cfg.train_steps)
                    if early_stop:
                        stop_reason = "early stop"
                        log.info("early stop at step %d: held-out reward did not improve in %d evaluations; "
                                 "the best was at step %s (held-out reward %s), kept in %s", step,
                                 cfg.early_stop_patience, self.state.best_step, self.state.best_eval_reward,
                                 self.best_path)
                        break
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
        self.save(stop_reason)
        return self._result(stop_reason)


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
    return torch.cat([top, bottom], dim=1)


__all__ = ["RewardLoRATrainer", "TrainConfig", "TrainResult", "StepReport", "TrainingDivergedError",
           "history_plot", "new_history"]
