"""Glue between the pack's plain-Python core and the ComfyUI host: model folders, the loaded-model
cache, and progress/interrupt callbacks for long loops."""

from __future__ import annotations

import gc
import os
import threading
import weakref
from pathlib import Path

import comfy.model_management as mm
import torch
import comfy.utils
import folder_paths

from ..easyanimate.loading import load_pipe
from ..fileio import confined_path
from ..easyanimate.model import EasyAnimateModel, EasyAnimatePipe
from . import host_memory

EASYANIMATE_FOLDER = "easyanimate"      # models/EasyAnimate/<model folder>/
REWARD_FOLDER = "reward_models"         # models/reward_models/
LORA_FOLDER = "loras"                   # the host's own models/loras/


def register_model_folders() -> None:
    """Register our folders with the host so extra_model_paths.yaml can add more locations."""
    for key, sub in ((EASYANIMATE_FOLDER, "EasyAnimate"), (REWARD_FOLDER, "reward_models")):
        path = os.path.join(folder_paths.models_dir, sub)
        os.makedirs(path, exist_ok=True)
        folder_paths.add_model_folder_path(key, path)


def lora_file_names() -> list[str]:
    """The LoRA files a user can pick in models/loras: the host's own list (the trainer keeps its
    training state outside models/loras, so every file listed there is a LoRA)."""
    return folder_paths.get_filename_list(LORA_FOLDER)


def model_folder_names() -> list[str]:
    """Sub-folders that look like EasyAnimate models (they have transformer/config.json)."""
    names = set()
    for base in folder_paths.get_folder_paths(EASYANIMATE_FOLDER):
        if os.path.isdir(base):
            for entry in os.scandir(base):
                if entry.is_dir() and os.path.isfile(os.path.join(entry.path, "transformer", "config.json")):
                    names.add(entry.name)
    return sorted(names)


def resolve_model_folder(name: str) -> str:
    bases = folder_paths.get_folder_paths(EASYANIMATE_FOLDER)
    for base in bases:
        candidate = confined_path(base, name, what="model", plain_name=True)
        if candidate.is_dir():
            return str(candidate)
    raise FileNotFoundError(f"EasyAnimate model folder {name!r} not found in: {', '.join(bases)}")


class PipeCache:
    """Finds the loaded EasyAnimate pipe again across queue runs: same folder + options = no reload.

    It holds the pipe weakly: the strong references are ComfyUI's own node-output caches, so the
    host's "free model and node cache" (or a graph that no longer uses the model) frees it, as it
    frees the host's own models. Loading another model first frees the GPU of the old one and asks
    the host to unload its models."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key = None
        self._pipe_ref: weakref.ref[EasyAnimatePipe] | None = None
        self.loads = 0  # how many times a folder was actually read from disk

    def _alive(self) -> EasyAnimatePipe | None:
        return None if self._pipe_ref is None else self._pipe_ref()

    def get(self, folder: str, precision: str, memory_mode: str) -> EasyAnimatePipe:
        stat = os.stat(os.path.join(folder, "transformer", "config.json"))
        key = (os.path.realpath(folder), stat.st_mtime_ns, precision, memory_mode)
        with self._lock:
            pipe = self._alive()
            if key == self._key and pipe is not None:
                host_memory.register(pipe)  # again, if the host unloaded it meanwhile
                return pipe
            del pipe
            self.release()
            mm.unload_all_models()
            # ComfyUI executes nodes under torch.inference_mode(); weights created there become
            # inference tensors, which autograd refuses to save, and reward training needs to.
            with torch.inference_mode(False):
                pipe = load_pipe(folder, precision, memory_mode, device=mm.get_torch_device(),
                                 offload_device=mm.unet_offload_device())
            self.loads += 1
            self._pipe_ref, self._key = weakref.ref(pipe), key
            host_memory.register(pipe)  # ComfyUI's free_memory / unload_all_models evict it too
            return pipe

    def release(self) -> None:
        """Free the GPU of the current pipe at once. If a cached graph branch still holds it, it keeps
        working: a pipe that lived on the GPU becomes a whole-module-offload pipe."""
        old = self._alive()
        self._pipe_ref, self._key = None, None
        if old is not None:
            old.placement.demote([old.transformer, old.vae, old.text_encoder, old.text_encoder_2])
            if old.lora_patcher is not None:
                old.lora_patcher.drop_device_copies()
        del old
        gc.collect()
        mm.soft_empty_cache()


PIPES = PipeCache()


def progress_callback(total: int, node_id: str | None = None, preview=None):
    """A (done, total, latest) callback that drives a ComfyUI progress bar and honours Cancel.
    `preview(done, total, latest)`: a preview image tuple to send with the bar, or None (nodes/speed.py)."""
    bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def on_step(done: int, total_now: int, _latest=None) -> None:
        mm.throw_exception_if_processing_interrupted()
        image = None if preview is None else preview(done, total_now, _latest)
        bar.update_absolute(done, total_now, image)

    return on_step


def check_interrupt() -> None:
    mm.throw_exception_if_processing_interrupted()


def output_subpath(name: str, base: str | None = None) -> Path:
    """A path for `name` inside `base` (default: ComfyUI's output folder); never outside it."""
    return confined_path(base or folder_paths.get_output_directory(), name)


__all__ = ["EasyAnimateModel", "PIPES", "register_model_folders", "model_folder_names", "resolve_model_folder",
           "progress_callback", "check_interrupt", "output_subpath"]
