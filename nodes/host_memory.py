"""Let ComfyUI's memory manager see and evict the pack's loaded pipe.

ComfyUI frees device memory for a new model (`load_models_gpu` -> `free_memory`, or "unload all
models" / `unload_all_models`) by walking `comfy.model_management.current_loaded_models`, a list of
`LoadedModel` entries around ModelPatchers. The pack's pipes are no ModelPatchers, so this module
registers one small `LoadedModel` subclass per pipe, backed by a ModelPatcher-like stub that
reports the pipe's sizes and, when the host unloads it, evicts the pipe through the core's own API
(`ModulePlacement.demote`: resident modules move to the offload device and the pipe continues as a
whole-module-offload pipe; the LoRA patcher drops its device copies). The pipe stays usable: the
next sampler call moves in what it needs. The entry holds the pipe weakly.
"""

from __future__ import annotations

import weakref

import comfy.model_management as mm
import torch

from ..easyanimate.model import EasyAnimatePipe


def _modules(pipe: EasyAnimatePipe) -> list:
    return [m for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2) if m is not None]


def evict(pipe: EasyAnimatePipe) -> None:
    """Free the compute device of everything the pipe holds there (keeps the pipe usable)."""
    pipe.placement.demote(_modules(pipe))
    if pipe.lora_patcher is not None:
        pipe.lora_patcher.drop_device_copies()


def _bytes(pipe: EasyAnimatePipe, device: torch.device | None = None) -> int:
    total = 0
    for module in _modules(pipe):
        for t in list(module.parameters()) + list(module.buffers()):
            if device is None or t.device == device:
                total += t.numel() * t.element_size()
    return total


class _PipePatcher:
    """The part of ModelPatcher's interface the host's memory manager calls on a loaded model."""

    parent = None

    def __init__(self, pipe: EasyAnimatePipe):
        self._pipe = weakref.ref(pipe)
        self.load_device = pipe.placement.device
        self.offload_device = pipe.placement.offload_device
        self.evictions = 0

    @property
    def model(self):  # the host logs model.model's class name and compares it in is_clone
        pipe = self._pipe()
        return None if pipe is None else pipe.transformer

    def model_size(self) -> int:
        pipe = self._pipe()
        return 0 if pipe is None else _bytes(pipe)

    def loaded_size(self) -> int:
        pipe = self._pipe()
        if pipe is None:
            return 0
        if pipe.placement.mode == "none":  # resident (on a CPU-only host the device is the CPU)
            return _bytes(pipe)
        return 0 if self.load_device == self.offload_device else _bytes(pipe, self.load_device)

    def current_loaded_device(self):
        return self.load_device if self.loaded_size() else self.offload_device

    def model_dtype(self):
        pipe = self._pipe()
        return None if pipe is None else pipe.dtype

    def model_patches_models(self) -> list:
        return []

    def model_patches_to(self, _device_or_dtype) -> None:
        pass

    def is_clone(self, other) -> bool:
        return other is self

    def lowvram_patch_counter(self) -> int:
        return 0

    def partially_unload(self, _device, _memory_to_free: int = 0) -> int:
        freed = self.loaded_size()
        self.detach()
        return freed

    def partially_load(self, _device, _extra_memory, force_patch_weights=False) -> int:
        return 0

    def detach(self, unpatch_all: bool = True) -> None:
        pipe = self._pipe()
        if pipe is not None:
            evict(pipe)
            self.evictions += 1


class PipeEntry(mm.LoadedModel):
    """A `current_loaded_models` entry for one pipe."""

    def __init__(self, pipe: EasyAnimatePipe):
        self.patcher = _PipePatcher(pipe)  # strong: LoadedModel itself only keeps a weak reference
        super().__init__(self.patcher)
        self.real_model = weakref.ref(pipe.transformer)  # the host drops entries whose model died
        self.model_finalizer = weakref.finalize(pipe.transformer, mm.cleanup_models)
        self.currently_used = False

    def model_unload(self, memory_to_free=None, unpatch_weights=True) -> bool:
        self.patcher.detach(unpatch_weights)
        if self.model_finalizer is not None:
            self.model_finalizer.detach()
            self.model_finalizer = None
        return True

    def is_dead(self) -> bool:
        return False


def register(pipe: EasyAnimatePipe) -> PipeEntry:
    """Put `pipe` into the host's list of loaded models (once; again after the host unloaded it)."""
    for entry in mm.current_loaded_models:
        if isinstance(entry, PipeEntry) and entry.patcher._pipe() is pipe:
            return entry
    entry = PipeEntry(pipe)
    mm.current_loaded_models.insert(0, entry)
    return entry
