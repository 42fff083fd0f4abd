"""HPS v2 / v2.1 (Human Preference Score): open_clip ViT-H-14 fine-tuned on human preferences.

score = cosine(image embedding, text embedding), no logit scale, as HPSv2's own `score()`
(its model returns normalised features and takes `image_features @ text_features.T`).

Official preprocessing (HPSv2's `create_model_and_transforms(..., light_augmentation=True)`) is
ToTensor -> `ResizeMaxSize(224, fill=0)` (bicubic, longest side to 224, centred black padding)
-> Normalize(OpenAI mean/std): our "letterbox" mode. "squash" (EasyAnimate's trainer resizes to
224x224) and "crop" are selectable.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch

from .clip_reward import TwoTowerReward
from .clip_text import open_clip_tokenizer
from .sources import HPS_FILES, HPS_SOURCE
from .state_dict import read_state_dict

log = logging.getLogger(__name__)

HPS_VERSION_ALIASES = {"v2": "v2", "v2.0": "v2", "2": "v2", "2.0": "v2", "v2.1": "v2.1", "2.1": "v2.1"}


def _image_size(model: torch.nn.Module) -> int:
    size = getattr(model.visual, "image_size", 224)
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"non-square CLIP input {size} is not supported")
        size = size[0]
    return int(size)


class HPSReward(TwoTowerReward):
    """HPS on an open_clip CLIP model (any size: ViT-H-14 for real, a tiny config for tests):
    HPSReward(model, tokenizer, preprocess_mode="letterbox", name="hps")."""

    name = "hps"
    default_preprocess_mode = "letterbox"
    # No clamp: HPS's official transform resizes the float tensor (after ToTensor), which does not
    # clip bicubic overshoot; with clamp=False our letterbox equals it to float rounding.
    clamp_default = False
    input_size = staticmethod(_image_size)

    def encode_text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(ids, normalize=True)

    def image_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self.pixel_values(frames), normalize=True)

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        image = self.image_embeddings(frames)
        text = self.text_embeddings(prompts)
        return (image.float() * text.float()).sum(dim=-1)


def resolve_hps_checkpoint(path: str | os.PathLike, version: str) -> str:
    """A file, or a folder holding the version's official file name; clear error otherwise."""
    filename = HPS_FILES[version]
    hint = f"get it from {HPS_SOURCE.format(name=filename)}"
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = os.path.join(path, filename)
        if not os.path.isfile(candidate):
            raise FileNotFoundError(f"HPS {version} checkpoint not found: expected {candidate} ({hint})")
        return candidate
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"HPS {version} checkpoint not found: {path} (the file should be {filename}; {hint})"
        )
    return path


def _register_config(model_name: str) -> str:
    """A registered open_clip name stays as is; a .json path is registered under its file stem."""
    import open_clip

    if model_name.endswith(".json"):
        if not os.path.isfile(model_name):
            raise FileNotFoundError(f"open_clip model config not found: {model_name}")
        open_clip.add_model_config(model_name)
        model_name = os.path.splitext(os.path.basename(model_name))[0]
    return model_name


def build_open_clip_model(model_name: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """An open_clip architecture with random weights, no download.

    `model_name` is a registered open_clip config ("ViT-H-14") or a path to a config .json file
    (registered on the fly under the file's stem, as open_clip's `add_model_config` does).
    """
    with torch.device(device):  # initialise where it will live
        return _quiet_create_model(_register_config(model_name), device)


class _DropRandomInitWarning(logging.Filter):
    # open_clip warns "Model initialized randomly" on the root logger; we load the weights right
    # after, so the line would only mislead ComfyUI users reading their console.
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def _quiet_create_model(name: str, device: torch.device | str) -> torch.nn.Module:
    import open_clip

    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        return open_clip.create_model(name, pretrained=None, device=device)
    finally:
        root.removeFilter(drop)


def _causal_mask_like(buffer: torch.Tensor) -> torch.Tensor:
    # open_clip's text causal mask: 0 on and below the diagonal, -inf above.
    n = buffer.shape[-1]
    return torch.full((n, n), float("-inf")).triu_(1)


def build_open_clip_with_weights(model_name: str, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Build on the meta device and adopt the checkpoint tensors (strict).

    A random ViT-H-14 init costs ~13 s of CPU and a second copy of the weights, all overwritten
    by the checkpoint. The only tensor not in the checkpoint is the text causal mask (a
    non-persistent buffer), rebuilt here; anything else left on meta falls back to a normal init.
    """
    name = _register_config(model_name)
    with torch.device("meta"):
        model = _quiet_create_model(name, "meta")
    model.load_state_dict(state_dict, strict=True, assign=True)
    for buffer_name, buffer in list(model.named_buffers()):
        if not buffer.is_meta:
            continue
        owner_name, _, leaf = buffer_name.rpartition(".")
        if leaf != "attn_mask" or buffer.ndim != 2 or buffer.shape[0] != buffer.shape[1]:
            log.info("open_clip %s has an unknown non-checkpoint buffer %s: using a regular init", name, buffer_name)
            model = build_open_clip_model(model_name, "cpu")
            model.load_state_dict(state_dict, strict=True)
            return model
        model.get_submodule(owner_name).register_buffer(leaf, _causal_mask_like(buffer), persistent=False)
    return model


def load_hps(
    checkpoint_path: str | os.PathLike,
    version: str = "v2.1",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    model_name: str = "ViT-H-14",
    preprocess_mode: str = "letterbox",
) -> HPSReward:
    """HPS v2 / v2.1 from a local checkpoint (file or folder). Weights load strictly."""
    if version not in HPS_VERSION_ALIASES:
        raise ValueError(f"unknown HPS version {version!r}; use 'v2' or 'v2.1'")
    version = HPS_VERSION_ALIASES[version]
    path = resolve_hps_checkpoint(checkpoint_path, version)
    state_dict = read_state_dict(path)
    model = build_open_clip_with_weights(model_name, state_dict)
    model.to(device=device, dtype=dtype)
    log.info("loaded HPS %s from %s (%s, %s)", version, path, device, dtype)
    return HPSReward(model, open_clip_tokenizer(), preprocess_mode, name=f"hps_{version}")
