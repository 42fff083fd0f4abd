"""Tiny random-weight stand-ins for the aesthetic predictors' files (tests and demos, no download).

They use the real classes and the real file layouts (a transformers CLIPModel / SiglipModel folder,
head state dicts with the public key names and hidden widths); only the backbone widths are tiny,
and the head's input width follows them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..fileio import atomic_folder, torch_save_atomic
from .aesthetic import (
    V2_5_HEAD_PREFIX,
    V2_5_LINEAR_POSITIONS,
    V2_HEAD_PREFIX,
    V2_LINEAR_POSITIONS,
    build_linear_stack,
    quiet_transformers,
)

TINY_EMBED_WIDTH = 32
HEAD_HIDDEN_WIDTHS = (1024, 128, 64, 16)  # as in both public heads


def _spread_weights(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Re-draw weights larger than the library init, so different images get visibly different
    embeddings (with the default init a tiny tower maps everything to nearly the same vector)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "logit" in name:
                continue
            is_gain = parameter.ndim == 1 and ("norm" in name) and name.endswith("weight")
            noise = torch.randn(parameter.shape, generator=generator) * std
            parameter.copy_(noise + (1.0 if is_gain else 0.0))


def _save_folder_atomically(model, dest: Path) -> Path:
    """save_pretrained into a temp folder next to `dest`, then swap it in (no half-written folder)."""
    dest = Path(dest)
    with atomic_folder(dest, replace=True) as staging:
        with quiet_transformers():  # (SigLIP's save warns about default text token ids we never use)
            model.save_pretrained(staging)
    return dest


def _tiny_towers(text_positions: int, image_size: int) -> tuple[dict, dict]:
    """Text and vision tower configs of the tiny backbones: 32 wide, one text layer, two vision
    layers, patch 14 like both real backbones."""
    text = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=text_positions, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vision = dict(hidden_size=TINY_EMBED_WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=14)
    return text, vision


def _write_tiny_model(model_class, config, dest: str | os.PathLike, seed: int) -> Path:
    torch.manual_seed(seed)
    model = model_class(config)
    _spread_weights(model, seed)
    return _save_folder_atomically(model.eval(), Path(dest))


def write_tiny_clip_folder(dest: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny transformers CLIPModel folder laid out like openai/clip-vit-large-patch14 (224, patch 14)."""
    from transformers import CLIPConfig, CLIPModel

    text, vision = _tiny_towers(text_positions=77, image_size=224)
    return _write_tiny_model(CLIPModel, CLIPConfig(text_config=text, vision_config=vision,
                                                   projection_dim=TINY_EMBED_WIDTH), dest, seed)


def write_tiny_siglip_folder(dest: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny transformers SiglipModel folder laid out like google/siglip-so400m-patch14-384 (384, patch 14)."""
    from transformers import SiglipConfig, SiglipModel

    text, vision = _tiny_towers(text_positions=64, image_size=384)
    return _write_tiny_model(SiglipModel, SiglipConfig(text_config=text, vision_config=vision), dest, seed)


def tiny_head_state_dict(version: str, in_width: int = TINY_EMBED_WIDTH, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random head weights under the public key names ("v2": layers.*, float32; "v2.5": scoring_head.*, bf16)."""
    if version == "v2":
        prefix, positions, dtype = V2_HEAD_PREFIX, V2_LINEAR_POSITIONS, torch.float32
    elif version == "v2.5":
        prefix, positions, dtype = V2_5_HEAD_PREFIX, V2_5_LINEAR_POSITIONS, torch.bfloat16
    else:
        raise ValueError(f"unknown aesthetic version {version!r}")
    generator = torch.Generator().manual_seed(seed)
    head = build_linear_stack((in_width, *HEAD_HIDDEN_WIDTHS, 1), positions)
    with torch.no_grad():
        for layer in (head[p] for p in positions):
            # Variance-preserving draws (std 1/sqrt(fan_in), times 3 on the unit-norm input) so the
            # score moves by about +-1 between images; the last bias puts it near 5, where real
            # aesthetic scores live (about 1..10).
            fan_in = layer.in_features
            gain = 3.0 if layer is head[positions[0]] else 1.0
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * gain / fan_in**0.5)
            layer.bias.zero_()
        head[positions[-1]].bias.fill_(5.0)
    return {f"{prefix}.{key}": value.to(dtype).contiguous() for key, value in head.state_dict().items()}


def write_tiny_aesthetic_head(dest: str | os.PathLike, version: str, in_width: int = TINY_EMBED_WIDTH, seed: int = 0) -> Path:
    """Write a head as the public files are: a torch-pickled plain state dict (.pth), atomically.

    (.pth, not safetensors, on purpose: the loader must read the exact format users download.)
    """
    return torch_save_atomic(dest, tiny_head_state_dict(version, in_width, seed))
