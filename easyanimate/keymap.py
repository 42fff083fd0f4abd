"""Module-path mapping between original EasyAnimate checkpoints and diffusers' transformer class.

Original EasyAnimate (and its official LoRA keys) keep the text stream of each MMDiT block in a
second attention module, `attn2`; diffusers' `EasyAnimateTransformer3DModel` folds it into `attn1`
as the "added" projections. Everything else has the same path in both:

    original                                  diffusers
    transformer_blocks.{i}.attn2.to_q         transformer_blocks.{i}.attn1.add_q_proj
    transformer_blocks.{i}.attn2.to_k         transformer_blocks.{i}.attn1.add_k_proj
    transformer_blocks.{i}.attn2.to_v         transformer_blocks.{i}.attn1.add_v_proj
    transformer_blocks.{i}.attn2.to_out.0     transformer_blocks.{i}.attn1.to_add_out
    transformer_blocks.{i}.attn2.norm_q       transformer_blocks.{i}.attn1.norm_added_q
    transformer_blocks.{i}.attn2.norm_k       transformer_blocks.{i}.attn1.norm_added_k

The functions accept module paths and parameter paths alike (`...attn2.to_q` or
`...attn2.to_q.weight`).
"""

from __future__ import annotations

import logging
import re
from typing import Mapping, TypeVar

log = logging.getLogger(__name__)

# original attn2 child -> diffusers attn1 child
_ATTN2_TO_DIFFUSERS = {
    "to_q": "add_q_proj",
    "to_k": "add_k_proj",
    "to_v": "add_v_proj",
    "to_out.0": "to_add_out",
    "norm_q": "norm_added_q",
    "norm_k": "norm_added_k",
}
_DIFFUSERS_TO_ATTN2 = {v: k for k, v in _ATTN2_TO_DIFFUSERS.items()}

# Modules of the original transformer that diffusers' class does not have (reference-image and
# CLIP-image projections of other EasyAnimate variants). Their checkpoint keys are dropped.
ORIGINAL_ONLY_PREFIXES = ("ref_proj", "clip_proj", "swa_layers")

# Longest alternatives first so that "to_out.0" is not cut short.
_ORIGINAL_RE = re.compile(
    r"^(?P<block>transformer_blocks\.\d+)\.attn2\.(?P<child>to_out\.0|to_q|to_k|to_v|norm_q|norm_k)(?P<rest>(\..*)?)$"
)
_DIFFUSERS_RE = re.compile(
    r"^(?P<block>transformer_blocks\.\d+)\.attn1\."
    r"(?P<child>add_q_proj|add_k_proj|add_v_proj|to_add_out|norm_added_q|norm_added_k)(?P<rest>(\..*)?)$"
)


def original_to_diffusers(path: str) -> str:
    """Module or parameter path of an original EasyAnimate transformer -> diffusers path.
    Paths that are the same in both (and diffusers paths) come back unchanged."""
    m = _ORIGINAL_RE.match(path)
    if m is None:
        return path
    return f"{m['block']}.attn1.{_ATTN2_TO_DIFFUSERS[m['child']]}{m['rest']}"


def diffusers_to_original(path: str) -> str:
    """Module or parameter path of diffusers' EasyAnimateTransformer3DModel -> original path."""
    m = _DIFFUSERS_RE.match(path)
    if m is None:
        return path
    return f"{m['block']}.attn2.{_DIFFUSERS_TO_ATTN2[m['child']]}{m['rest']}"


def is_original_only(path: str) -> bool:
    """True for original-checkpoint modules that diffusers' class has no counterpart for."""
    return any(path == p or path.startswith(p + ".") for p in ORIGINAL_ONLY_PREFIXES)


def is_original_state_dict(keys) -> bool:
    """An original-format transformer checkpoint names its text-stream attention `attn2`."""
    return any(_ORIGINAL_RE.match(k) for k in keys)


V = TypeVar("V")


def convert_original_state_dict(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Rename an original-format transformer state dict to diffusers' keys. Keys of modules that
    diffusers' class lacks (ref_proj, clip_proj, ...) are dropped (logged). Tensors are not copied."""
    converted: dict[str, V] = {}
    dropped = []
    for key, value in state_dict.items():
        if is_original_only(key):
            dropped.append(key)
            continue
        new_key = original_to_diffusers(key)
        if new_key in converted:
            raise ValueError(f"checkpoint has both {key!r} and a key that also maps to {new_key!r}")
        converted[new_key] = value
    if dropped:
        log.info("dropped %d original-only transformer keys with no diffusers counterpart (e.g. %s)",
                 len(dropped), dropped[0])
    return converted


def convert_diffusers_state_dict(state_dict: Mapping[str, V]) -> dict[str, V]:
    """The inverse rename: diffusers keys -> original EasyAnimate keys."""
    return {diffusers_to_original(k): v for k, v in state_dict.items()}
