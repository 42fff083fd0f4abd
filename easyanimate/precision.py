"""fp16 for V5 models: the VAE in float32 and attention computed in float32.

Facts from the official loader (comfyui/comfyui_nodes.py LoadEasyAnimateModel, easyanimate/ui/ui.py):
with precision fp16 and a model that is not V5.1 it sets `vae.upcast_vae = True` (its
AutoencoderKLMagvit then runs encoder, decoder and the quant convolutions in float32 and casts the
input up) and passes `upcast_attention=True` to the transformer. V5.1 in fp16 is left as it is.
The pack decides "V5" from the folder's config (Bert + T5 text encoders), not from the name.

Here: the VAE's weights are kept in float32 and a pre-hook casts the inputs of its encoder,
decoder and quant convolutions to float32 (callers may pass fp16 latents or frames), and every
attention processor of the transformer runs its scaled-dot-product attention on float32 query,
key and value (the result is cast back to fp16 before the output projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

VAE_UPCAST_PARTS = ("encoder", "quant_conv", "decoder", "post_quant_conv")

# The dtype names of the whole pack, defined once. PRECISIONS: what a model loads in (the node's
# and the CLI's choices). SAVE_DTYPES: what a LoRA file is written in. DTYPE_NAMES: every accepted
# spelling (rewards take "float32" as well as "fp32"). REWARD_DTYPES: the reward loader's choices.
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
REWARD_DTYPES = ("auto", "float32", "bfloat16", "float16")  # "auto": see reward.registry.resolve_dtype


def needs_fp16_upcast(version: str, dtype: torch.dtype) -> bool:
    return dtype == torch.float16 and version == "v5"


def _to_float32(module, args):
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def upcast_vae(vae) -> None:
    vae.float()
    for name in VAE_UPCAST_PARTS:
        part = getattr(vae, name, None)
        if part is not None:
            part.register_forward_pre_hook(_to_float32)
    vae._easyanimate_upcast = True


class _Float32Attention(TorchFunctionMode):
    """Inside it, scaled_dot_product_attention runs on float32 inputs and returns the input dtype."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args and args[0].dtype in (torch.float16, torch.bfloat16):
            dtype = args[0].dtype
            args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
            mask = kwargs.get("attn_mask")
            if isinstance(mask, torch.Tensor) and mask.is_floating_point():
                kwargs = {**kwargs, "attn_mask": mask.float()}
            return func(*args, **kwargs).to(dtype)
        return func(*args, **kwargs)


class UpcastAttnProcessor:
    """Wraps a diffusers attention processor; its attention product runs in float32."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        with _Float32Attention():
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def upcast_attention(transformer) -> int:
    """Wrap every attention processor of the transformer; returns how many were wrapped."""
    from diffusers.models.attention_processor import Attention

    count = 0
    for module in transformer.modules():
        if isinstance(module, Attention) and not isinstance(module.processor, UpcastAttnProcessor):
            module.set_processor(UpcastAttnProcessor(module.processor))
            module.upcast_attention = module.upcast_softmax = True
            count += 1
    return count


def apply_fp16_policy(version: str, dtype: torch.dtype, transformer, vae) -> bool:
    """The official fp16 treatment for V5 models (see the module docstring); True if applied."""
    if not needs_fp16_upcast(version, dtype):
        return False
    upcast_vae(vae)
    upcast_attention(transformer)
    return True
