"""LoRA nodes: apply a LoRA to an EASYANIMATE_MODEL (live strength, no reload) and save a merged model."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import folder_paths
import torch
from comfy_api.latest import io

from ..easyanimate.lora_format import LoraWeights, load_lora_file
from ..easyanimate.lora_merge import merged_model_destination, save_merged_model
from ..easyanimate.lora_patch import DEFAULT_MODE, MODES
from .common import EASYANIMATE_FOLDER, LORA_FOLDER, lora_file_names, progress_callback
from .types import EasyAnimateModelType

MODE_TOOLTIP = (
    "fused: the LoRA is merged into the weights before sampling (full speed; a CPU copy of the "
    "touched weights is kept so strength changes and removal are exact, never re-read from disk). "
    "unfused: the LoRA runs beside each layer (weights untouched, small extra cost per step); "
    "recommended with the qfloat8 memory mode, where a merged delta would be lost in fp8 rounding. "
    f"Default: {DEFAULT_MODE}."
)

# Parsed LoRA files, keyed by (path, mtime, size, transformer config): a strength change in the
# graph re-runs the node but re-reads nothing. A few entries only: a 12b LoRA is ~1.8 GB.
_CACHE_SIZE = 3
_cache: OrderedDict[tuple, LoraWeights] = OrderedDict()
_cache_lock = threading.Lock()


def _config_key(transformer) -> tuple:
    config = getattr(transformer, "config", None) or {}
    return tuple(sorted((k, repr(v)) for k, v in dict(config).items()))


def cached_lora(path: str, transformer) -> LoraWeights:
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size, _config_key(transformer))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    # Outside ComfyUI's inference mode: a trainer may later backpropagate through these adapters.
    with torch.inference_mode(False):
        weights = load_lora_file(path, transformer)
    with _cache_lock:
        _cache[key] = weights
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return weights


class EasyAnimateLoraApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateReward_LoraApply",
            display_name="EasyAnimate Apply LoRA",
            category="EasyAnimate/lora",
            description="Adds a LoRA to the model's LoRA stack. Nothing is merged here: the sampler "
                        "patches the stack in just before it runs, so changing the strength is instant "
                        "and the model you plug in stays unchanged for other branches.",
            inputs=[
                EasyAnimateModelType.Input("model"),
                io.Combo.Input("lora_name", options=lora_file_names(),
                               tooltip="A LoRA from models/loras: official EasyAnimate (kohya) or PEFT format."),
                io.Float.Input("strength", default=0.7, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier of the LoRA update (the reward LoRAs recommend 0.7). "
                                       "0 leaves the model as it is."),
                io.Combo.Input("mode", options=list(MODES), default=DEFAULT_MODE, tooltip=MODE_TOOLTIP),
            ],
            outputs=[EasyAnimateModelType.Output(display_name="model")],
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
        return io.Schema(
            node_id="EasyAnimateReward_SaveMerged",
            display_name="EasyAnimate Save Merged Model",
            category="EasyAnimate/lora",
            description="Bakes the model's LoRA stack into a copy of its transformer and saves a complete "
                        "model folder (other parts hardlinked) into the first easyanimate models folder.",
            is_output_node=True,
            inputs=[
                EasyAnimateModelType.Input("model"),
                io.String.Input("name", default="EasyAnimate-merged",
                                tooltip="Name of the new model folder (a plain name; it must not exist yet)."),
            ],
            outputs=[io.String.Output(display_name="folder")],
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
        return io.NodeOutput(str(dest))


NODES = [EasyAnimateLoraApply, EasyAnimateSaveMerged]
