"""Reward LoRA training as a node: EASYANIMATE_MODEL + REWARD_MODEL + prompts -> trained LoRA."""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io, ui

from ..easyanimate.lora_format import load_lora_file
from ..training.config import BACKPROP_STRATEGIES, TrainConfig, parse_optional_number
from ..training.memory_options import OPTIMIZERS
from ..training.run_layout import RUNS_FOLDER, RunLayout
from ..training.prompts import load_prompts
from ..training.trainer import RewardLoRATrainer as CoreTrainer, StepReport, history_plot
from .guard_inputs import guard_inputs, guard_settings
from .common import LORA_FOLDER, check_interrupt, lora_file_names, progress_callback
from .types import EasyAnimateModelType, RewardModelType

log = logging.getLogger(__name__)

NO_RESUME = "[none]"


def _resume_options() -> list[str]:
    return [NO_RESUME] + lora_file_names()


def run_layout(lora_name: str) -> RunLayout:
    """The run `lora_name`: its LoRA files in models/loras, its run folder in
    output/easyanimate_reward_runs (outside every LoRA list)."""
    loras_dir = folder_paths.get_folder_paths(LORA_FOLDER)[0]
    return RunLayout.in_folders(loras_dir, _runs_root(), lora_name)


def _runs_root() -> str:
    return os.path.join(folder_paths.get_output_directory(), RUNS_FOLDER)


def _resume_layout(resume_from: str) -> RunLayout:
    """The run of a LoRA picked in the list, in whichever loras folder holds it."""
    full = folder_paths.get_full_path_or_raise(LORA_FOLDER, resume_from)
    for root in folder_paths.get_folder_paths(LORA_FOLDER):
        layout = RunLayout.in_folders(root, _runs_root(), resume_from)
        if os.path.abspath(layout.lora) == os.path.abspath(full):
            return layout
    return RunLayout.for_lora_file(full)


class RewardLoRATrainerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateReward_RewardLoRATrainer",
            hidden=[io.Hidden.unique_id],  # cls.hidden.unique_id: progress bar and text on this node
            display_name="EasyAnimate Reward LoRA Trainer",
            category="EasyAnimate/training",
            description="Trains a LoRA on the transformer by reward backpropagation: samples videos from noise with the "
                        "real sampler, keeps gradients only on the chosen denoising steps, decodes the first latents, "
                        "scores frames with the reward and updates the LoRA to raise the score. Saves the LoRA to "
                        "models/loras (official EasyAnimate format); with held-out prompts also "
                        "<name>.best.safetensors, the LoRA of the best held-out reward. Settings, history and the "
                        "optimizer state for an exact resume go to output/easyanimate_reward_runs/<name>/. A run "
                        "never replaces files of another run: a taken name gets a counter (<name>_001).",
            is_output_node=True,
            inputs=[
                EasyAnimateModelType.Input("model", tooltip="The model to train on; LoRAs already applied stay under it."),
                RewardModelType.Input("reward", tooltip="The reward to maximise (frozen; only the LoRA learns)."),
                io.String.Input("prompts", multiline=True, default="A cat playing the piano in a sunny room.",
                                tooltip="Training prompts, one per line; or the name of a .txt (a prompt a line) or "
                                        ".jsonl (key \"prompt\") file in ComfyUI's input folder."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt of the guided rollout (the official trainer uses none)."),
                io.Int.Input("width", default=256, min=16, max=2048, step=16, tooltip="Training resolution, multiple of 16."),
                io.Int.Input("height", default=256, min=16, max=2048, step=16, tooltip="Training resolution, multiple of 16."),
                io.Int.Input("frames", default=49, min=1, max=145, step=4, tooltip="1 + 4k frames sampled per video."),
                io.Int.Input("train_steps", default=2000, min=1, max=1_000_000,
                             tooltip="Optimizer steps (the official runs use 2000-3500)."),
                io.Int.Input("sampling_steps", default=50, min=1, max=200, tooltip="Denoising steps of each rollout."),
                io.Float.Input("cfg", default=6.0, min=1.0, max=20.0, step=0.1,
                               tooltip="Guidance scale of the rollout; 1 disables guidance (half the compute)."),
                io.Combo.Input("backprop", options=list(BACKPROP_STRATEGIES), default="auto",
                               tooltip="Which denoising steps keep gradients (the others run without a graph). "
                                       "auto: last for V5, tail K for V5.1 (last-step gradients vanish with flow "
                                       "matching). last; tail: the last K; uniform: K spread evenly; random: K drawn "
                                       "each step from [start, end]; list: the steps listed; all: every step "
                                       "(memory grows with the step count)."),
                io.Int.Input("backprop_k", default=10, min=1, max=200, tooltip="K for tail / uniform / random."),
                io.Int.Input("backprop_start", default=0, min=-200, max=200,
                             tooltip="random: first step of the range (negative counts from the end)."),
                io.Int.Input("backprop_end", default=-1, min=-200, max=200,
                             tooltip="random: last step of the range (-1 = the last step)."),
                io.String.Input("backprop_steps", default="", tooltip="list: step indices such as '0, 25, -1'."),
                io.Boolean.Input("drtune", default=False,
                                 tooltip="DRTune: stop the gradient at the transformer input on the kept steps, so "
                                         "each step's gradient reaches the LoRA without flowing through earlier steps."),
                io.Int.Input("num_decoded_latents", default=1, min=1, max=64,
                             tooltip="Decode only the first k latents (1 = the first frame; k = 1 + 4(k-1) frames)."),
                io.Int.Input("num_sampled_frames", default=1, min=0, max=256,
                             tooltip="Evenly spaced frames of the decoded part that the reward scores "
                                     "(linspace(0, F-1, n) rounded down, as the official trainer); 0 = all decoded frames."),
                io.Int.Input("rank", default=128, min=1, max=1024, tooltip="LoRA rank."),
                io.Float.Input("alpha", default=64.0, min=0.01, max=4096.0, step=0.01,
                               tooltip="LoRA alpha; the update is scaled by alpha / rank."),
                io.String.Input("target_modules", default="",
                                tooltip="Regex on module paths to adapt (e.g. 'attn1\\.to_(q|k|v)'); empty = every Linear."),
                io.Float.Input("learning_rate", default=1e-5, min=1e-9, max=1.0, step=1e-6, round=False,
                               tooltip="AdamW learning rate (official: 1e-5)."),
                io.Float.Input("weight_decay", default=3e-2, min=0.0, max=1.0, step=1e-3, round=False,
                               tooltip="AdamW weight decay."),
                io.Float.Input("adam_eps", default=1e-10, min=1e-12, max=1e-3, step=1e-10, round=False,
                               tooltip="AdamW epsilon."),
                io.Float.Input("max_grad_norm", default=0.3, min=0.0, max=100.0, step=0.01,
                               tooltip="Gradient-norm clipping; 0 disables it."),
                io.Int.Input("grad_accumulation", default=1, min=1, max=1024, tooltip="Rollouts per optimizer step."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Prompts per rollout."),
                io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFFFFFF,
                             tooltip="Seeds the LoRA init, the prompt order and the rollout noise."),
                io.String.Input("max_reward", default="",
                                tooltip="Empty: loss = -reward. A finite number: loss = |reward - max_reward| (stops "
                                        "pushing past a target)."),
                io.Float.Input("loss_scale", default=1.0, min=1e-6, max=1e6, step=0.01, round=False,
                               tooltip="Multiplies the loss."),
                io.Int.Input("save_every", default=100, min=0, max=1_000_000,
                             tooltip="Save the LoRA every N steps (0: only at the end). It is also saved when "
                                     "training is cancelled or fails. Each save also writes the run's "
                                     "training_state.safetensors (AdamW's state, in the run folder), so a resume "
                                     "continues exactly."),
                io.String.Input("lora_name", default="easyanimate_reward_lora",
                                tooltip="Relative file name in models/loras ('.safetensors' is added); with held-out "
                                        "prompts <name>.best.safetensors goes beside it. If any file of that name "
                                        "exists (and resume_from is not this run), the run gets <name>_001, ..."),
                io.String.Input("eval_prompts", multiline=True, default="",
                                tooltip="Held-out prompts (lines or a file name), scored without gradients on fixed "
                                        "seeds. Training reward rising while held-out stalls = reward hacking."),
                io.Int.Input("eval_every", default=0, min=0, max=1_000_000,
                             tooltip="Score the held-out prompts every N steps (0: never). The LoRA with the best held-out "
                                     "reward so far is kept as <name>.best.safetensors (+ .json)."),
                io.Int.Input("early_stop_patience", default=0, min=0, max=10_000,
                             tooltip="Stop after this many held-out evaluations without improvement (0: never); "
                                     "the summary then names the best checkpoint (<name>.best.safetensors)."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in backward (transformer and VAE): far less memory."),
                io.Boolean.Input("activation_offload", default=False, optional=True,
                                 tooltip="Keep the tensors saved for backward in CPU RAM (pinned) instead of on the "
                                         "GPU: less VRAM, more RAM, some transfer time. No effect on a CPU device."),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw", optional=True,
                               tooltip="adamw: torch AdamW. adamw_8bit: bitsandbytes' 8-bit AdamW (about 2 bytes of "
                                       "state per LoRA parameter instead of 8; saved for an exact resume too)."),
                *guard_inputs(),
                io.Combo.Input("resume_from", options=_resume_options(), default=NO_RESUME, optional=True,
                               tooltip="Continue a run from its LoRA (step count, history, AdamW's state and float32 "
                                       "weights come from its run folder: the run continues as if never stopped). "
                                       "With lora_name = this run's name it writes on into the same files; with "
                                       "another name a new run starts from it."),
            ],
            outputs=[
                EasyAnimateModelType.Output(display_name="model", tooltip="The model with the trained LoRA applied."),
                io.String.Output(display_name="lora_name", tooltip="The saved LoRA, relative to models/loras."),
                io.Image.Output(display_name="plot", tooltip="Reward and loss per step (training and held-out)."),
            ],
        )

    @classmethod
    def execute(cls, model, reward, prompts, negative_prompt, width, height, frames, train_steps, sampling_steps,
                cfg, backprop, backprop_k, backprop_start, backprop_end, backprop_steps, drtune, num_decoded_latents,
                num_sampled_frames, rank, alpha, target_modules, learning_rate, weight_decay, adam_eps, max_grad_norm,
                grad_accumulation, batch_size, seed, max_reward, loss_scale, save_every, lora_name, eval_prompts,
                eval_every, early_stop_patience, gradient_checkpointing, resume_from=NO_RESUME,
                activation_offload=False, optimizer="adamw", **guards) -> io.NodeOutput:
        search = [folder_paths.get_input_directory()]
        train_prompts = load_prompts(prompts, search, "training prompts", confine=True)
        held_out = load_prompts(eval_prompts, search, "held-out prompts", allow_empty=True, confine=True)
        config = TrainConfig(
            width=width, height=height, frames=frames, sampling_steps=sampling_steps, guidance_scale=cfg,
            negative_prompt=negative_prompt, backprop=backprop, backprop_k=backprop_k, backprop_start=backprop_start,
            backprop_end=backprop_end, backprop_steps=backprop_steps, detach_input=drtune,
            num_decoded_latents=num_decoded_latents, num_sampled_frames=num_sampled_frames,
            max_reward=parse_optional_number(max_reward, "max_reward"), loss_scale=loss_scale, rank=rank, alpha=alpha,
            target_modules=target_modules, train_steps=train_steps, learning_rate=learning_rate,
            weight_decay=weight_decay, adam_eps=adam_eps, max_grad_norm=max_grad_norm,
            grad_accumulation=grad_accumulation, batch_size=batch_size, seed=seed,
            gradient_checkpointing=gradient_checkpointing, save_every=save_every, eval_every=eval_every,
            early_stop_patience=early_stop_patience, activation_offload=activation_offload, optimizer=optimizer,
            **guard_settings(guards),
        ).validate()
        layout = run_layout(lora_name)
        resume = _resume_layout(resume_from) if resume_from and resume_from != NO_RESUME else None

        node_id = cls.hidden.unique_id if cls.hidden else None
        progress = progress_callback(train_steps, node_id)

        def on_step(report: StepReport) -> None:
            text = (f"step {report.step}/{report.total}  reward {report.reward:.5g}  loss {report.loss:.5g}  "
                    f"grad norm {report.grad_norm:.3g}  ({report.seconds:.1f} s/step)")
            if report.eval_reward is not None:
                text += f"\nheld-out reward {report.eval_reward:.5g}"
            _show_text(text, node_id)

        trainer = CoreTrainer(
            model, reward, train_prompts, config, layout=layout, eval_prompts=held_out, resume_layout=resume,
            progress=progress, check_interrupt=check_interrupt, on_step=on_step,
            extra_info={"reward": getattr(reward, "name", type(reward).__name__)})
        result = trainer.train()
        loras_dir = folder_paths.get_folder_paths(LORA_FOLDER)[0]
        name = _relative_name(result.layout.lora, loras_dir)
        summary = f"{result.stop_reason} at step {result.state.step}: saved models/loras/{name}"
        if result.best_path is not None:
            best_name = _relative_name(result.best_path, loras_dir)
            summary += (f"\nbest held-out reward {result.best_eval_reward:.5g} at step {result.best_step}: "
                        f"models/loras/{best_name}")
        summary += f"\nrun folder: {result.layout.folder}"
        _show_text(summary, node_id)
        # The wire carries exactly what the file holds (bf16), so the LoRA picked later by name
        # in EasyAnimateLoraApply behaves the same as this output.
        weights = load_lora_file(result.saved_path, model.pipe.transformer)
        plot = history_plot(result.state.history)
        preview = ui.PreviewImage(plot, cls=cls)
        shown = {"images": preview.values, "animated": (False,), "text": (summary,)}
        return io.NodeOutput(model.with_lora(weights, 1.0, name), name, plot, ui=shown)


def _relative_name(path, folder: str) -> str:
    """models/loras-relative name of a file the trainer wrote (forward slashes, as the LoRA lists show)."""
    try:
        return os.path.relpath(path, folder).replace(os.sep, "/")
    except ValueError:  # another drive (Windows): show the full path
        return str(path)


def _show_text(text: str, node_id: str | None) -> None:
    log.info("RewardLoRATrainer: %s", text.replace("\n", "; "))
    if node_id is None:
        return
    try:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # no UI connected (API use, tests): the log line is enough
        pass


NODES = [RewardLoRATrainerNode]
