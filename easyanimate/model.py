"""What a loaded EasyAnimate model is, and what flows along an EASYANIMATE_MODEL wire."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: importing these here would load diffusers / transformers
    from diffusers import AutoencoderKLMagvit, EasyAnimateTransformer3DModel
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from .lora_format import LoraWeights
    from .lora_patch import LoraPatcher
    from .memory import ModulePlacement


@dataclass(frozen=True)
class AppliedLora:
    """One LoRA in a model's stack."""

    name: str
    weights: LoraWeights
    strength: float


@dataclass(eq=False)
class EasyAnimatePipe:
    """The loaded components of one model folder. Shared (and cached) by every model built on it."""

    folder: str
    version: str  # "v5" (Bert + T5, DDIM) or "v5.1" (Qwen2-VL, flow matching)
    transformer: EasyAnimateTransformer3DModel
    vae: AutoencoderKLMagvit
    text_encoder: nn.Module  # BertModel (V5) or Qwen2VLForConditionalGeneration (V5.1)
    tokenizer: PreTrainedTokenizerBase
    text_encoder_2: nn.Module | None  # T5EncoderModel (V5), None for V5.1
    tokenizer_2: PreTrainedTokenizerBase | None
    scheduler_config: dict
    dtype: torch.dtype
    placement: ModulePlacement
    lora_patcher: LoraPatcher | None = None  # created on first use (lora_patch.get_patcher)
    # What the VAE plans its tiles for (easyanimate/vae.py vae_budget): "auto" (the compute
    # device's free memory at each call), None (never tile) or a number of bytes.
    vae_budget_bytes: int | str | None = "auto"

    @property
    def compute_device(self) -> torch.device:
        return self.placement.device


@dataclass(frozen=True, eq=False)
class EasyAnimateModel:
    """A pipe plus the LoRAs that should be active on it. Immutable: ComfyUI caches node outputs,
    so two graph branches holding different stacks on one pipe must both stay right."""

    pipe: EasyAnimatePipe
    loras: tuple[AppliedLora, ...] = ()

    def with_lora(self, weights: LoraWeights, strength: float, name: str) -> "EasyAnimateModel":
        return replace(self, loras=self.loras + (AppliedLora(name, weights, float(strength)),))

    @property
    def version(self) -> str:
        return self.pipe.version
