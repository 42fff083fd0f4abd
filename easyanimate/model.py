"""What a loaded EasyAnimate model is, and what flows along an EASYANIMATE_MODEL wire."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass(frozen=True)
class AppliedLora:
    """One LoRA in a model's stack. `weights` is a `LoraWeights` (see easyanimate/lora_format.py)."""

    name: str
    weights: Any
    strength: float


@dataclass(eq=False)
class EasyAnimatePipe:
    """The loaded components of one model folder. Shared (and cached) by every model built on it."""

    folder: str
    version: str  # "v5" (Bert + T5, DDIM) or "v5.1" (Qwen2-VL, flow matching)
    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    text_encoder_2: Any | None
    tokenizer_2: Any | None
    scheduler_config: dict
    dtype: torch.dtype
    placement: Any  # easyanimate.memory.ModulePlacement
    lora_patcher: Any = None  # easyanimate.lora_patch.LoraPatcher, created on first use
    options: dict = field(default_factory=dict)

    @property
    def compute_device(self) -> torch.device:
        return self.placement.device


@dataclass(frozen=True, eq=False)
class EasyAnimateModel:
    """A pipe plus the LoRAs that should be active on it. Immutable: ComfyUI caches node outputs,
    so two graph branches holding different stacks on one pipe must both stay right."""

    pipe: EasyAnimatePipe
    loras: tuple[AppliedLora, ...] = ()

    def with_lora(self, weights: Any, strength: float, name: str) -> "EasyAnimateModel":
        return replace(self, loras=self.loras + (AppliedLora(name, weights, float(strength)),))

    @property
    def version(self) -> str:
        return self.pipe.version
