"""What the three CLIP-family rewards (HPS, PickScore, MPS) share: device/dtype of the weights,
the preprocess-mode check, pixel_values, and encoding each distinct prompt once."""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch

from .base import Reward
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, RESIZE_MODES, clip_preprocess

Encoded = TypeVar("Encoded", torch.Tensor, tuple)


def unique_prompts(prompts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Distinct prompts in first-seen order, and for every input row the index of its prompt."""
    position: dict[str, int] = {}
    rows = [position.setdefault(prompt, len(position)) for prompt in prompts]
    return list(position), torch.tensor(rows, dtype=torch.long)


def encode_unique(prompts: Sequence[str], encode: Callable[[list[str]], Encoded]) -> Encoded:
    """`encode(prompts)` computed on the distinct prompts only, rows then repeated back per input.

    A video's frames all share one prompt: without this a B-frame batch runs the text tower on B
    identical rows. `encode` returns a tensor or a tuple of tensors, each batched on dim 0.
    """
    distinct, rows = unique_prompts(prompts)
    encoded = encode(distinct)
    if isinstance(encoded, torch.Tensor):
        return encoded[rows.to(encoded.device)]
    return tuple(t[rows.to(t.device)] for t in encoded)


class ClipReward(Reward):
    """Base of the CLIP-family rewards: the weights set the device/dtype every input is moved to."""

    needs_prompts = True  # they score image-text agreement

    def __init__(self, preprocess_mode: str, image_size: int, name: str, clamp: bool = True):
        super().__init__()
        if preprocess_mode not in RESIZE_MODES:
            raise ValueError(f"unknown preprocess mode {preprocess_mode!r}; choose one of {RESIZE_MODES}")
        self.preprocess_mode = preprocess_mode
        self.image_size = int(image_size)
        self.name = name
        self.clamp = clamp  # clamp the bicubic overshoot to [0, 1] before normalising

    @property
    def device_dtype(self) -> tuple[torch.device, torch.dtype]:
        weight = next(self.parameters())
        return weight.device, weight.dtype

    def pixel_values(self, frames: torch.Tensor) -> torch.Tensor:
        device, dtype = self.device_dtype
        pixels = clip_preprocess(
            frames.to(device), self.image_size, self.preprocess_mode, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clamp=self.clamp
        )
        return pixels.to(dtype)


class TwoTowerReward(ClipReward):
    """A CLIP model (image and text towers) and its tokenizer: HPS on open_clip, PickScore on
    transformers. Subclasses give the defaults, the input size and how the text tower is called;
    the text side runs once per distinct prompt, without a graph (it never depends on the frames)."""

    default_preprocess_mode = "crop"
    clamp_default = True  # clamp the bicubic overshoot (see ClipReward)

    def __init__(self, model: torch.nn.Module, tokenizer, preprocess_mode: str | None = None, name: str | None = None):
        super().__init__(preprocess_mode or self.default_preprocess_mode, self.input_size(model),
                         name or type(self).name, clamp=self.clamp_default)
        self.model = model
        self.tokenizer = tokenizer
        self.freeze()

    @staticmethod
    def input_size(model: torch.nn.Module) -> int:
        raise NotImplementedError

    def encode_text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        device, _ = self.device_dtype
        return encode_unique(prompts, lambda distinct: self.encode_text_ids(self.tokenizer(distinct).to(device)))
