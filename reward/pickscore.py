"""PickScore v1: a transformers CLIP-H fine-tuned on Pick-a-Pic preferences.

score = logit_scale.exp() * cosine(image embedding, text embedding) (PickScore's README; ~20 for a
good match). `use_logit_scale=False` gives the plain cosine (~0.2) that EasyAnimate's reward
trainer uses (its `|r - 1|` loss with max_reward 1 assumes that scale). Its processor is LAION CLIP-ViT-H-14's: shortest side to 224 (bicubic), centre crop
224, OpenAI mean/std: our "crop" mode.

Embeddings are taken as `visual_projection(vision_model(x).pooler_output)` and
`text_projection(text_model(ids).pooler_output)`: transformers 5 turned `get_image_features` /
`get_text_features` into output objects, the explicit path is identical on 4.x and 5.x.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from .clip_reward import TwoTowerReward
from .clip_text import ClipTokenizer, tokenizer_for_folder
from .sources import PICKSCORE_SOURCE, TRANSFORMERS_WEIGHT_FILES

log = logging.getLogger(__name__)



def clip_image_embeddings(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    return model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)


def clip_text_embeddings(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model.text_projection(model.text_model(input_ids=input_ids).pooler_output)


class PickScoreReward(TwoTowerReward):
    """PickScore on a transformers `CLIPModel` (CLIP-H for real, a tiny config for tests)."""

    name = "pickscore"

    def __init__(self, model: torch.nn.Module, tokenizer: ClipTokenizer, preprocess_mode: str = "crop",
                 name: str = "pickscore", use_logit_scale: bool = True):
        super().__init__(model, tokenizer, preprocess_mode, name)
        self.use_logit_scale = bool(use_logit_scale)

    @staticmethod
    def input_size(model: torch.nn.Module) -> int:
        return model.config.vision_config.image_size

    def encode_text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return clip_text_embeddings(self.model, ids)

    def score_pixels(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Score already-preprocessed pixel_values (B, 3, 224, 224)."""
        image = clip_image_embeddings(self.model, pixel_values).float()
        text = self.text_embeddings(prompts).float()
        cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1, eps=1e-12)
        if not self.use_logit_scale:
            return cosine
        return self.model.logit_scale.float().exp() * cosine

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.score_pixels(self.pixel_values(frames), prompts)


def check_clip_folder(folder: str | os.PathLike, what: str, hint: str) -> str:
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} folder not found: {folder} (a transformers CLIPModel folder, from {hint})")
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"{what}: missing {config} (the folder must hold a transformers CLIPModel from {hint})")
    if not any(os.path.isfile(os.path.join(folder, f)) for f in TRANSFORMERS_WEIGHT_FILES):
        raise FileNotFoundError(
            f"{what}: no weights in {folder}: expected one of {', '.join(TRANSFORMERS_WEIGHT_FILES)} (from {hint})"
        )
    return folder


def load_clip_model_folder(folder: str, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import CLIPModel

    from ..easyanimate.folder_files import check_folder_files

    check_folder_files(Path(folder), "the PickScore CLIPModel: config.json and its weights")
    # Local files only; transformers reads .bin with weights_only and never runs remote code here.
    model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=dtype)
    return model.to(device).eval()


def load_pickscore(
    folder: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    preprocess_mode: str = "crop",
    use_logit_scale: bool = True,
) -> PickScoreReward:
    """PickScore v1 from a local folder (config.json + weights, tokenizer files optional)."""
    folder = check_clip_folder(folder, "PickScore", PICKSCORE_SOURCE)
    model = load_clip_model_folder(folder, device, dtype)
    tokenizer = tokenizer_for_folder(folder)
    log.info("loaded PickScore from %s (%s, %s), tokenizer: %s", folder, device, dtype, tokenizer.source)
    return PickScoreReward(model, tokenizer, preprocess_mode, use_logit_scale=use_logit_scale)
