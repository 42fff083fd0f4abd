"""Tiny randomly initialised CLIP-family checkpoints, written in the real on-disk formats.

For tests and the offline demo: the same classes and the same file layouts as the real HPS,
PickScore and MPS files, only small (a few MB, built in well under a second). The text towers keep
the real 49408-token CLIP vocabulary and 77-token context so the real tokenizers apply; images
stay 224 so the real preprocessing applies (a 32-pixel patch keeps the vision tower to 50 tokens).
"""

from __future__ import annotations

import json
import os

import torch

from ..fileio import atomic_folder, torch_save_atomic, write_text_atomic
from .mps import MPSCrossModel, MPSModel, build_clip_model
from .sources import HPS_FILES, MPS_CHECKPOINT_FILE

TINY_OPEN_CLIP_NAME = "tiny-hps-vit"

# open_clip CLIP config (same schema as open_clip's ViT-H-14.json).
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

# transformers CLIPConfig kwargs (same schema as mps.CLIP_VIT_H14_CONFIG).
TINY_HF_CLIP_CONFIG = {
    "projection_dim": 32,
    "logit_scale_init_value": 2.6592,
    "text_config": {
        "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "gelu",
        "projection_dim": 32, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    },
    "vision_config": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": 224, "patch_size": 32, "hidden_act": "gelu", "projection_dim": 32,
    },
}
TINY_CROSS_MODEL_CONFIG = {"dim": 32, "layers": 2, "heads": 2, "dim_head": 16, "ff_mult": 2}


def _randomise(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Random weights large enough that scores differ visibly between inputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("logit_scale"):
                continue
            gain = p.ndim == 1 and name.endswith("weight")  # LayerNorm gains stay around 1
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if gain else 0.0))


def write_tiny_open_clip_config(folder: str | os.PathLike) -> str:
    path = os.path.join(os.fspath(folder), f"{TINY_OPEN_CLIP_NAME}.json")
    write_text_atomic(path, json.dumps(TINY_OPEN_CLIP_CONFIG, indent=2))
    return path


def tiny_open_clip_model(seed: int = 0) -> torch.nn.Module:
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(**TINY_OPEN_CLIP_CONFIG)
    _randomise(model, seed)
    return model.eval()


def write_tiny_hps_checkpoint(folder: str | os.PathLike, version: str = "v2.1", seed: int = 0) -> tuple[str, str]:
    """Fake HPS file in the official layout ({"state_dict": ...}, "module." prefixes as DDP saves).

    Returns (checkpoint path, open_clip config .json path to pass as `model_name`).
    """
    folder = os.fspath(folder)
    model = tiny_open_clip_model(seed)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    ckpt = os.path.join(folder, HPS_FILES[version])
    torch_save_atomic(ckpt, {"state_dict": state})
    return ckpt, write_tiny_open_clip_config(folder)


def tiny_hf_clip_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_clip_model(TINY_HF_CLIP_CONFIG)
    _randomise(model, seed)
    return model.eval()


def write_tiny_pickscore_folder(folder: str | os.PathLike, seed: int = 0) -> str:
    """A transformers CLIPModel folder (config.json + model.safetensors), no tokenizer files."""
    folder = os.path.abspath(os.fspath(folder))
    with atomic_folder(folder, replace=True) as partial:
        tiny_hf_clip_model(seed).save_pretrained(partial, safe_serialization=True)
    return folder


def tiny_mps_model(seed: int = 0) -> MPSModel:
    torch.manual_seed(seed)
    mps = MPSModel(build_clip_model(TINY_HF_CLIP_CONFIG), MPSCrossModel(**TINY_CROSS_MODEL_CONFIG))
    _randomise(mps, seed)
    return mps.eval()


def write_tiny_mps_checkpoint(folder: str | os.PathLike, seed: int = 0) -> str:
    """A plain state dict with model.* / cross_model.* keys, as EasyAnimate's MPS_overall.pth."""
    path = os.path.join(os.fspath(folder), MPS_CHECKPOINT_FILE)
    torch_save_atomic(path, tiny_mps_model(seed).state_dict())
    return path
