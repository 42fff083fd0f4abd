"""Configs of original-format EasyAnimate folders, translated for diffusers' classes.

The published V5 folders (alibaba-pai/EasyAnimateV5-{7b,12b}-zh[-InP|-Control]) were written by
EasyAnimate's own classes, not by diffusers':

- transformer/config.json by aigc-apps/EasyAnimate `easyanimate/models/transformer3d.py`
  `EasyAnimateTransformer3DModel` (a ConfigMixin dump: "_diffusers_version": "0.30.1", plus keys
  that diffusers' class does not have: `ref_channels`, `clip_channels`, `swa_layers`,
  `enable_clip_in_inpaint`, `position_of_clip_embedding`, `add_ref_latent_in_control_model`).
- vae/config.json by `easyanimate/models/autoencoder_magvit.py` `AutoencoderKLMagvit` (keys `ch`,
  `ch_mult`, `mid_block_*`, `slice_mag_vae`, `cache_mag_vae`, `mini_batch_encoder`, `use_tiling`, ...).

Facts this module relies on (checked by building both classes from the same config):

Transformer
- Argument names are the same in both classes; the DEFAULTS differ. A key missing from an
  original config means the original default, not diffusers': num_attention_heads 30, num_layers
  30, mmdit_layers 10000 (every block MMDiT), text_embed_dim 4096, text_embed_dim_t5 4096,
  resize_inpaint_mask_directly False, add_noise_in_inpaint_model False (diffusers: 48, 48, 48, 3584,
  None, True, True). Early V5 uploads lacked mmdit_layers / enable_text_attention_mask /
  add_noise_in_inpaint_model (added by HF commit "Update config", e.g. EasyAnimateV5-12b-zh-Control
  2c934e1: "add_noise_in_inpaint_model": true, "enable_text_attention_mask": false, "mmdit_layers": 48).
- The official scripts never use config.json alone: predict_*.py and comfyui/comfyui_nodes.py call
  `from_pretrained_2d(..., transformer_additional_kwargs=<yaml>)`, which overrides the file. For V5
  (config/easyanimate_video_v5_magvit_multi_text_encoder.yaml): after_norm false,
  time_position_encoding_type "3d_rope", resize_inpaint_mask_directly true,
  enable_text_attention_mask false, enable_clip_in_inpaint false. V5.1
  (easyanimate_video_v5.1_magvit_qwen.yaml) is the same except enable_text_attention_mask true.
- Weight keys: only the text-stream attention differs (`attn2.*` -> `attn1.add_*`, see keymap.py);
  `text_proj.0/1`, `text_proj_t5.0/1` (add_norm_text_encoder), non-MMDiT blocks and everything else
  match. `ref_proj`/`clip_proj` exist only when ref_channels/clip_channels are set (not in V5 InP).
  `swa_layers` switches blocks to sliding-window attention, which diffusers lacks: refused.
- The original transformer never applies a text attention mask inside attention (its DiT block
  does not pass one); `enable_text_attention_mask` only decides whether the pipeline gives the mask
  to the TEXT ENCODERS (pipeline_easyanimate_inpaint.py encode_prompt). V5: no mask to Bert / T5.

VAE
- Same state-dict keys and identical encode/decode outputs as diffusers' AutoencoderKLMagvit when
  down/up block types are the Spatial[Temporal]{Down,Up}Block3D ones, so no key conversion is needed.
- Defaults differ: latent_channels 4, scaling_factor 0.1825, spatial_group_norm False,
  block_out_channels derived from ch * ch_mult when null (diffusers: 16, 0.7125, True).
- slice/cache/tiling/mini_batch keys choose how the original splits frames; the V5 yaml forces
  cache_mag_vae true, mini_batch_encoder 4, mini_batch_decoder 1, which is what diffusers' class does
  unconditionally. They are dropped.
"""

from __future__ import annotations

import ast
import logging
from typing import Any

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Transformer

# Keys only the original class writes; any of them marks an original-format config.
ORIGINAL_ONLY_TRANSFORMER_KEYS = frozenset({
    "ref_channels", "clip_channels", "swa_layers", "enable_clip_in_inpaint",
    "position_of_clip_embedding", "add_ref_latent_in_control_model",
})

# Original __init__ defaults that differ from diffusers' (used for keys missing from the file).
_ORIGINAL_TRANSFORMER_DEFAULTS = {
    "num_attention_heads": 30,
    "num_layers": 30,
    "mmdit_layers": 10000,
    "text_embed_dim": 4096,
    "text_embed_dim_t5": 4096,
    "resize_inpaint_mask_directly": False,
    "enable_text_attention_mask": True,
    "add_noise_in_inpaint_model": False,
}

# diffusers' EasyAnimateTransformer3DModel.__init__ arguments (0.42.1); kept explicit so the
# translation is a pure function that does not import diffusers.
_DIFFUSERS_TRANSFORMER_KEYS = frozenset({
    "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "patch_size",
    "sample_width", "sample_height", "activation_fn", "timestep_activation_fn", "freq_shift",
    "num_layers", "mmdit_layers", "dropout", "time_embed_dim", "add_norm_text_encoder",
    "text_embed_dim", "text_embed_dim_t5", "norm_eps", "norm_elementwise_affine", "flip_sin_to_cos",
    "time_position_encoding_type", "after_norm", "resize_inpaint_mask_directly",
    "enable_text_attention_mask", "add_noise_in_inpaint_model",
})


def is_original_transformer_config(cfg: dict) -> bool:
    """True for a transformer config written by EasyAnimate's own class (judged by its keys)."""
    return any(k in cfg for k in ORIGINAL_ONLY_TRANSFORMER_KEYS)


def translate_transformer_config(cfg: dict) -> dict:
    """Original EasyAnimate transformer config -> kwargs for diffusers' EasyAnimateTransformer3DModel,
    with the values the official inference scripts actually run with (file + yaml overrides)."""
    if cfg.get("swa_layers"):
        raise ValueError(f"transformer config has swa_layers={cfg['swa_layers']!r} (sliding-window attention); "
                         "diffusers' EasyAnimateTransformer3DModel cannot run it")
    for key in ("ref_channels", "clip_channels"):
        if cfg.get(key) is not None:
            log.info("transformer config sets %s=%s; its projection has no diffusers counterpart and is dropped "
                     "(only used for reference-image / CLIP-image inputs)", key, cfg[key])
    out = {k: v for k, v in cfg.items() if k in _DIFFUSERS_TRANSFORMER_KEYS}
    for key, value in _ORIGINAL_TRANSFORMER_DEFAULTS.items():
        out.setdefault(key, value)
    if out.get("in_channels") is None or out.get("patch_size") is None:
        raise ValueError("transformer config lacks in_channels or patch_size (the original class has no default)")
    out["mmdit_layers"] = min(int(out["mmdit_layers"]), int(out["num_layers"]))
    # Official inference yaml (transformer_additional_kwargs) overrides; V5 is the two-encoder model.
    is_v5 = out.get("text_embed_dim_t5") is not None
    out.update(after_norm=False, time_position_encoding_type="3d_rope", resize_inpaint_mask_directly=True,
               enable_text_attention_mask=not is_v5)
    return out


def original_v5_transformer_config(diffusers_cfg: dict) -> dict:
    """A diffusers transformer config written the way the published V5 transformer/config.json is
    (every original __init__ key, V5 values), for building original-format test folders."""
    keep = {k: v for k, v in dict(diffusers_cfg).items() if k in _DIFFUSERS_TRANSFORMER_KEYS}
    if keep.get("text_embed_dim_t5") is None:
        raise ValueError("a V5 transformer needs text_embed_dim_t5 (its second, T5 text encoder)")
    out = {"_class_name": "EasyAnimateTransformer3DModel", "_diffusers_version": "0.30.1"}
    out.update(keep)
    out.update(
        add_noise_in_inpaint_model=keep.get("add_noise_in_inpaint_model", True),
        after_norm=False, clip_channels=None, ref_channels=None, swa_layers=None,
        enable_clip_in_inpaint=False, enable_text_attention_mask=False,
        position_of_clip_embedding="full", add_ref_latent_in_control_model=False,
        resize_inpaint_mask_directly=True, time_position_encoding_type="3d_rope",
    )
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# VAE

ORIGINAL_ONLY_VAE_KEYS = frozenset({
    "ch", "ch_mult", "use_gc_blocks", "mid_block_type", "mid_block_use_attention",
    "mid_block_attention_type", "mid_block_num_attention_heads", "num_attention_heads",
    "slice_mag_vae", "slice_compression_vae", "cache_compression_vae", "cache_mag_vae",
    "use_tiling", "use_tiling_encoder", "use_tiling_decoder", "mini_batch_encoder",
    "mini_batch_decoder", "upcast_vae", "tile_sample_min_size", "tile_overlap_factor",
})

_DIFFUSERS_VAE_KEYS = frozenset({
    "in_channels", "latent_channels", "out_channels", "block_out_channels", "down_block_types",
    "up_block_types", "layers_per_block", "act_fn", "norm_num_groups", "scaling_factor",
    "spatial_group_norm",
})
_ORIGINAL_VAE_DEFAULTS = {"latent_channels": 4, "scaling_factor": 0.1825, "spatial_group_norm": False,
                          "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu"}
_DOWN_TYPES = frozenset({"SpatialDownBlock3D", "SpatialTemporalDownBlock3D"})
_UP_TYPES = frozenset({"SpatialUpBlock3D", "SpatialTemporalUpBlock3D"})


def is_original_vae_config(cfg: dict) -> bool:
    """True for a VAE config written by EasyAnimate's own AutoencoderKLMagvit (judged by its keys)."""
    return any(k in cfg for k in ORIGINAL_ONLY_VAE_KEYS)


def _block_types(value: Any, allowed: frozenset, what: str) -> list[str]:
    # The original class accepts a Python-literal string such as '("SpatialDownBlock3D", ...)'.
    if isinstance(value, str):
        value = ast.literal_eval(value)
    types = [str(v) for v in (value or [])]
    unknown = sorted(set(types) - allowed)
    if not types or unknown:
        raise ValueError(f"VAE config {what}={value!r}: diffusers' AutoencoderKLMagvit supports only "
                         f"{', '.join(sorted(allowed))}")
    return types


def translate_vae_config(cfg: dict) -> dict:
    """Original EasyAnimate AutoencoderKLMagvit config -> kwargs for diffusers' AutoencoderKLMagvit."""
    if any(cfg.get("use_gc_blocks") or []):
        raise ValueError("VAE config uses global-context blocks (use_gc_blocks); diffusers' class has none")
    if cfg.get("mid_block_type", "MidBlock3D") != "MidBlock3D":
        raise ValueError(f"VAE config mid_block_type={cfg['mid_block_type']!r}; only MidBlock3D is supported")
    out = {k: v for k, v in cfg.items() if k in _DIFFUSERS_VAE_KEYS}
    for key, value in _ORIGINAL_VAE_DEFAULTS.items():
        out.setdefault(key, value)
    if out.get("block_out_channels") is None:
        out["block_out_channels"] = [cfg.get("ch", 128) * m for m in cfg.get("ch_mult", [1, 2, 4, 4])]
    out["block_out_channels"] = list(out["block_out_channels"])
    out["down_block_types"] = _block_types(cfg.get("down_block_types"), _DOWN_TYPES, "down_block_types")
    out["up_block_types"] = _block_types(cfg.get("up_block_types"), _UP_TYPES, "up_block_types")
    return out


def original_v5_vae_config(diffusers_cfg: dict) -> dict:
    """A diffusers VAE config written the way the published V5 vae/config.json is."""
    keep = {k: v for k, v in dict(diffusers_cfg).items() if k in _DIFFUSERS_VAE_KEYS}
    out = {"_class_name": "AutoencoderKLMagvit", "_diffusers_version": "0.30.1"}
    out.update(keep)
    out.update(
        ch=128, ch_mult=[1, 2, 4, 4], use_gc_blocks=None, mid_block_type="MidBlock3D",
        mid_block_use_attention=False, mid_block_attention_type="spatial", mid_block_num_attention_heads=1,
        num_attention_heads=1, force_upcast=True, slice_mag_vae=False, slice_compression_vae=False,
        cache_compression_vae=False, cache_mag_vae=True, use_tiling=False, use_tiling_encoder=False,
        use_tiling_decoder=False, mini_batch_encoder=4, mini_batch_decoder=1, upcast_vae=False,
        tile_sample_min_size=384, tile_overlap_factor=0.25,
    )
    return dict(sorted(out.items()))
