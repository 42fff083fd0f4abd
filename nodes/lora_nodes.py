"""LoRA nodes: apply a LoRA to an EASYANIMATE_MODEL (live strength, no reload) and save a merged model."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..easyanimate.lora_cache import cached_lora
from ..easyanimate.lora_merge import merged_model_destination, save_merged_model
from ..easyanimate.lora_patch import DEFAULT_MODE, MODES
from .common import EASYANIMATE_FOLDER, LORA_FOLDER, lora_file_names, progress_callback
from .schema import model_input, model_output, node_schema, shown, text_output

CATEGORY = "EasyAnimate/lora"

MODE_TOOLTIP = (
    "fused: the LoRA is merged into the weights before sampling (full speed; a CPU copy of the "
    "touched weights is kept so strength changes and removal are exact, never re-read from disk). "
    "unfused: the LoRA runs beside each layer (weights untouched, small extra cost per step); "
    "recommended with the qfloat8 memory mode, where a merged delta would be lost in fp8 rounding. "
    f"Default: {DEFAULT_MODE}."
)


class EasyAnimateLoraApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "LoraApply", "EasyAnimate Apply LoRA", CATEGORY,
            "Adds a LoRA to the model's LoRA stack. Nothing is merged here: the sampler patches the stack in just "
            "before it runs, so changing the strength is instant and the model you plug in stays unchanged for "
            "other branches.",
            inputs=[
                model_input("The model to add the LoRA to (it stays unchanged for other branches)."),
                io.Combo.Input("lora_name", options=lora_file_names(),
                               tooltip="A LoRA from models/loras: official EasyAnimate (kohya) or PEFT format."),
                io.Float.Input("strength", default=0.7, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier of the LoRA update (the reward LoRAs recommend 0.7). "
                                       "0 leaves the model as it is."),
                io.Combo.Input("mode", options=list(MODES), default=DEFAULT_MODE, tooltip=MODE_TOOLTIP),
            ],
            outputs=[model_output("The same model with this LoRA on its stack (patched in when a sampler runs).")],
        )

    @classmethod
    def fingerprint_inputs(cls, model, lora_name, strength, mode):
        # Re-run when the file on disk changes under the same name.
        try:
            stat = os.stat(folder_paths.get_full_path_or_raise(LORA_FOLDER, lora_name))
            return (lora_name, stat.st_mtime_ns, stat.st_size, strength, mode)
        except Exception:
            return float("nan")  # never equal: let execute report the problem

    @classmethod
    def execute(cls, model, lora_name, strength, mode):
        if strength == 0:
            return io.NodeOutput(model)
        path = folder_paths.get_full_path_or_raise(LORA_FOLDER, lora_name)
        weights = cached_lora(path, model.pipe.transformer)
        return io.NodeOutput(model.with_lora(weights.with_mode(mode), strength, lora_name))


class EasyAnimateSaveMerged(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "SaveMerged", "EasyAnimate Save Merged Model", CATEGORY,
            "Bakes the model's LoRA stack into a copy of its transformer and saves a complete model folder (other "
            "parts hardlinked) into the first easyanimate models folder.",
            inputs=[
                model_input("The model whose LoRA stack is baked in (Apply LoRA nodes before this one)."),
                io.String.Input("name", default="EasyAnimate-merged",
                                tooltip="Name of the new model folder (a plain name; it must not exist yet)."),
            ],
            outputs=[text_output("folder", "The new model folder's full path.")],
            output_node=True,
        )

    @classmethod
    def execute(cls, model, name):
        root = folder_paths.get_folder_paths(EASYANIMATE_FOLDER)[0]
        os.makedirs(root, exist_ok=True)
        dest = merged_model_destination(root, name)
        if not model.loras:
            raise ValueError("the model has no LoRA applied; there is nothing to merge")
        targets = len({path for lora in model.loras for path in lora.weights.modules})
        save_merged_model(model.pipe, model.loras, dest, progress=progress_callback(max(targets, 1)))
        return shown(str(dest), text=f"saved {dest}")


NODES = [EasyAnimateLoraApply, EasyAnimateSaveMerged]
