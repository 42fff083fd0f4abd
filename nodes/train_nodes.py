"""Reward LoRA training as nodes: the trainer (EASYANIMATE_MODEL + REWARD_MODEL + prompts ->
trained LoRA) and four optional settings nodes. Every setting's input is generated from the one
settings table (training/config.py, training/settings.py), the same table the CLI's flags come from."""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io, ui

from ..easyanimate.lora_format import load_lora_file
from ..training.config import PromptSources, TrainConfig
from ..training.prompts import load_prompt_items, load_prompts
from ..training.run_layout import RUNS_FOLDER, RunLayout
from ..training.settings import (
    GROUP_TITLES,
    RUN,
    SETTINGS_GROUPS,
    TrainingSettings,
    group_rows,
    parse_number_text,
    rows,
    split_by_table,
)
from ..training.trainer import RewardLoRATrainer as CoreTrainer, StepReport, history_plot
from .common import LORA_FOLDER, check_interrupt, lora_file_names, progress_callback
from .types import EasyAnimateModelType, RewardModelType, TrainSettingsTypes

log = logging.getLogger(__name__)

NO_RESUME = "[none]"
TABLES = (TrainConfig, PromptSources)


def setting_input(row, optional: bool = False):
    """The node input of one row of the settings table."""
    spec, common = row.spec, dict(tooltip=row.spec.tooltip, optional=optional)
    if row.kind is bool:
        return io.Boolean.Input(row.name, default=row.default, **common)
    if spec.choices:
        return io.Combo.Input(row.name, options=list(spec.choices), default=row.default, **common)
    if spec.optional_number:  # a number that may be unset: typed as text, "" = unset
        return io.String.Input(row.name, default="" if row.default is None else f"{row.default:g}", **common)
    if row.kind is int:
        return io.Int.Input(row.name, default=row.default, min=int(spec.min), max=int(spec.max),
                            **({"step": int(spec.step)} if spec.step else {}), **common)
    if row.kind is float:
        return io.Float.Input(row.name, default=row.default, min=spec.min, max=spec.max, step=spec.step or 0.01,
                              round=False, **common)
    return io.String.Input(row.name, default=row.default, multiline=spec.multiline, **common)


def node_values(values: dict) -> dict:
    """Widget values -> setting values (optional numbers parsed from their text)."""
    specs = {row.name: row.spec for row in rows(*TABLES)}
    return {name: parse_number_text(value, name) if specs[name].optional_number else value
            for name, value in values.items()}


def _settings_node(group: str) -> type[io.ComfyNode]:
    title, description = GROUP_TITLES[group]
    wire = TrainSettingsTypes[group]

    class TrainSettingsNode(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id=f"EasyAnimateReward_Train{title.replace(' and ', '').replace(' ', '')}Settings",
                display_name=f"EasyAnimate Reward Trainer: {title}",
                category="EasyAnimate/training",
                description=f"{description} Connect to the Reward LoRA Trainer's '{group}' input; without it the "
                            "trainer uses these defaults (the official trainer's where it has one).",
                inputs=[setting_input(row) for row in group_rows(group, *TABLES)],
                outputs=[wire.Output(display_name=group, tooltip=f"The {title.lower()} settings for the trainer.")],
            )

        @classmethod
        def execute(cls, **values) -> io.NodeOutput:
            return io.NodeOutput(TrainingSettings(group, node_values(values)))

    TrainSettingsNode.__name__ = TrainSettingsNode.__qualname__ = f"Train{group.title()}SettingsNode"
    return TrainSettingsNode


SETTINGS_NODES = [_settings_node(group) for group in SETTINGS_GROUPS]


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


def settings_from_inputs(run_values: dict, groups: dict) -> tuple[TrainConfig, PromptSources]:
    """The trainer node's own settings + its connected settings nodes -> the run's settings (groups
    not connected keep the table's defaults)."""
    values = dict(node_values(run_values))
    for group, settings in groups.items():
        if settings is None:
            continue
        if not isinstance(settings, TrainingSettings) or settings.group != group:
            raise TypeError(f"the trainer's {group!r} input needs the {group} settings node")
        values.update(settings.values)
    config_values, source_values = split_by_table(values, *TABLES)
    return TrainConfig(**config_values).validate(), PromptSources(**source_values)


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
                        "<name>.best.safetensors. Settings, history, plot, numbered checkpoints, TensorBoard logs, "
                        "validation videos and the optimizer state for an exact resume go to "
                        "output/easyanimate_reward_runs/<name>/. A run never replaces files of another run: a taken "
                        "name gets a counter (<name>_001). The four optional settings nodes change the defaults.",
            is_output_node=True,
            inputs=[
                EasyAnimateModelType.Input("model", tooltip="The model to train on; LoRAs already applied stay under it."),
                RewardModelType.Input("reward", tooltip="The reward to maximise (frozen; only the LoRA learns)."),
                io.String.Input("prompts", multiline=True, default="A cat playing the piano in a sunny room.",
                                tooltip="Training prompts, one per line ('start.png | prompt' starts that video from "
                                        "an image of the input folder, on InP models); or the name of a .txt or "
                                        ".jsonl (keys \"prompt\", optional \"image\") file in ComfyUI's input folder."),
                io.String.Input("lora_name", default="easyanimate_reward_lora",
                                tooltip="Relative file name in models/loras ('.safetensors' is added); with held-out "
                                        "prompts <name>.best.safetensors goes beside it. If any file of that name "
                                        "exists (and resume_from is not this run), the run gets <name>_001, ..."),
                *(setting_input(row) for row in group_rows(RUN, *TABLES)),
                *(TrainSettingsTypes[group].Input(group, optional=True, tooltip=GROUP_TITLES[group][1] +
                                                  " From the matching settings node; unconnected: the defaults.")
                  for group in SETTINGS_GROUPS),
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
    def execute(cls, model, reward, prompts, lora_name, resume_from=NO_RESUME, **inputs) -> io.NodeOutput:
        groups = {group: inputs.pop(group, None) for group in SETTINGS_GROUPS}
        config, sources = settings_from_inputs(inputs, groups)
        search = [folder_paths.get_input_directory()]
        train_prompts = load_prompt_items(prompts, search, "training prompts")
        held_out = load_prompts(sources.eval_prompts, search, "held-out prompts", allow_empty=True, confine=True)
        validation = load_prompts(sources.validation_prompts, search, "validation prompts", allow_empty=True,
                                  confine=True)
        layout = run_layout(lora_name)
        resume = _resume_layout(resume_from) if resume_from and resume_from != NO_RESUME else None
        node_id = cls.hidden.unique_id if cls.hidden else None
        trainer = CoreTrainer(
            model, reward, train_prompts, config, layout=layout, eval_prompts=held_out, resume_layout=resume,
            validation_prompts=validation, progress=progress_callback(config.train_steps, node_id),
            check_interrupt=check_interrupt, on_step=lambda report: _show_text(_step_text(report), node_id),
            extra_info={"reward": getattr(reward, "name", type(reward).__name__)})
        result = trainer.train()
        summary, name = _summary(result)
        _show_text(summary, node_id)
        # The wire carries exactly what the file holds (bf16), so the LoRA picked later by name
        # in EasyAnimateLoraApply behaves the same as this output.
        weights = load_lora_file(result.saved_path, model.pipe.transformer)
        plot = history_plot(result.state.history)
        preview = ui.PreviewImage(plot, cls=cls)
        shown = {"images": preview.values, "animated": (False,), "text": (summary,)}
        return io.NodeOutput(model.with_lora(weights, 1.0, name), name, plot, ui=shown)


def _step_text(report: StepReport) -> str:
    text = (f"step {report.step}/{report.total}  reward {report.reward:.5g}  loss {report.loss:.5g}  "
            f"grad norm {report.grad_norm:.3g}  lr {report.lr:.3g}  ({report.seconds:.1f} s/step)")
    if report.eval_reward is not None:
        text += f"\nheld-out reward {report.eval_reward:.5g}"
    if report.validation_reward is not None:
        text += f"\nvalidation reward {report.validation_reward:.5g}"
    return text


def _summary(result) -> tuple[str, str]:
    loras_dir = folder_paths.get_folder_paths(LORA_FOLDER)[0]
    name = _relative_name(result.layout.lora, loras_dir)
    summary = f"{result.stop_reason} at step {result.state.step}: saved models/loras/{name}"
    if result.best_path is not None:
        best_name = _relative_name(result.best_path, loras_dir)
        summary += (f"\nbest held-out reward {result.best_eval_reward:.5g} at step {result.best_step}: "
                    f"models/loras/{best_name}")
    summary += f"\nrun folder: {result.layout.folder}"
    return summary, name


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


NODES = [RewardLoRATrainerNode, *SETTINGS_NODES]
