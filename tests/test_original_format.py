"""Original-format (EasyAnimate's own classes) V5 folders: config translation and strict loading."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from easyanimate_reward.easyanimate.keymap import convert_diffusers_state_dict
from easyanimate_reward.easyanimate.loading import ModelFolderError, load_pipe
from easyanimate_reward.easyanimate.model import EasyAnimateModel
from easyanimate_reward.easyanimate.original_format import (
    is_original_transformer_config, is_original_vae_config, original_v5_transformer_config,
    original_v5_vae_config, translate_transformer_config, translate_vae_config)
from easyanimate_reward.easyanimate.sampling import SampleRequest, sample_video
from easyanimate_reward.easyanimate.text import encode_prompts
from easyanimate_reward.easyanimate.tiny import BERT_WIDTH, T5_WIDTH, build_tiny_transformer, build_tiny_vae

# Shaped like the published EasyAnimateV5-12b-zh-InP transformer/config.json (a dump of the
# original class's __init__ args after HF commit "Update config"), tiny sizes.
ORIGINAL_V5_TRANSFORMER = {
    "_class_name": "EasyAnimateTransformer3DModel",
    "_diffusers_version": "0.30.1",
    "activation_fn": "gelu-approximate",
    "add_noise_in_inpaint_model": True,
    "after_norm": False,
    "attention_head_dim": 16,
    "clip_channels": None,
    "dropout": 0.0,
    "enable_clip_in_inpaint": False,
    "enable_text_attention_mask": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 33,
    "mmdit_layers": 2,
    "norm_elementwise_affine": True,
    "norm_eps": 1e-05,
    "num_attention_heads": 2,
    "num_layers": 2,
    "out_channels": 16,
    "patch_size": 2,
    "ref_channels": None,
    "resize_inpaint_mask_directly": True,
    "sample_height": 16,
    "sample_width": 16,
    "swa_layers": None,
    "text_embed_dim": BERT_WIDTH,
    "text_embed_dim_t5": T5_WIDTH,
    "time_embed_dim": 32,
    "time_position_encoding_type": "3d_rope",
    "timestep_activation_fn": "silu",
}

ORIGINAL_V5_VAE = {
    "_class_name": "AutoencoderKLMagvit",
    "_diffusers_version": "0.30.1",
    "act_fn": "silu",
    "block_out_channels": [8, 8, 8, 8],
    "cache_compression_vae": False,
    "cache_mag_vae": True,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "down_block_types": '("SpatialDownBlock3D", "SpatialTemporalDownBlock3D", "SpatialTemporalDownBlock3D", '
                        '"SpatialTemporalDownBlock3D")',
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 1,
    "mid_block_attention_type": "spatial",
    "mid_block_num_attention_heads": 1,
    "mid_block_type": "MidBlock3D",
    "mid_block_use_attention": False,
    "mini_batch_decoder": 1,
    "mini_batch_encoder": 4,
    "norm_num_groups": 4,
    "num_attention_heads": 1,
    "out_channels": 3,
    "scaling_factor": 0.7125,
    "slice_compression_vae": False,
    "slice_mag_vae": False,
    "spatial_group_norm": True,
    "tile_overlap_factor": 0.25,
    "tile_sample_min_size": 384,
    "up_block_types": ["SpatialUpBlock3D", "SpatialTemporalUpBlock3D", "SpatialTemporalUpBlock3D",
                       "SpatialTemporalUpBlock3D"],
    "upcast_vae": False,
    "use_gc_blocks": None,
    "use_tiling": False,
    "use_tiling_decoder": False,
    "use_tiling_encoder": False,
}


def test_transformer_config_translation_uses_original_defaults_and_yaml_overrides():
    from diffusers import EasyAnimateTransformer3DModel

    assert is_original_transformer_config(ORIGINAL_V5_TRANSFORMER)
    assert not is_original_transformer_config(dict(build_tiny_transformer("v5").config))
    cfg = translate_transformer_config(ORIGINAL_V5_TRANSFORMER)
    assert not set(cfg) & {"ref_channels", "clip_channels", "swa_layers", "enable_clip_in_inpaint", "_class_name"}
    assert cfg["enable_text_attention_mask"] is False and cfg["resize_inpaint_mask_directly"] is True
    model = EasyAnimateTransformer3DModel.from_config(cfg)
    assert model.text_proj_t5.in_features == T5_WIDTH

    # An early upload without the keys added later: the ORIGINAL defaults apply, not diffusers'.
    early = {k: v for k, v in ORIGINAL_V5_TRANSFORMER.items()
             if k not in ("mmdit_layers", "add_noise_in_inpaint_model", "enable_text_attention_mask",
                          "text_embed_dim_t5")}
    cfg = translate_transformer_config(early)
    assert cfg["mmdit_layers"] == 2  # original default 10000 = every block is MMDiT
    assert cfg["add_noise_in_inpaint_model"] is False
    assert cfg["text_embed_dim_t5"] == 4096
    assert cfg["enable_text_attention_mask"] is False  # V5 yaml: two-encoder model, no mask

    v51 = dict(ORIGINAL_V5_TRANSFORMER, text_embed_dim_t5=None, add_norm_text_encoder=True)
    assert translate_transformer_config(v51)["enable_text_attention_mask"] is True
    with pytest.raises(ValueError, match="sliding-window"):
        translate_transformer_config(dict(ORIGINAL_V5_TRANSFORMER, swa_layers=[0]))


def test_vae_config_translation():
    from diffusers import AutoencoderKLMagvit

    assert is_original_vae_config(ORIGINAL_V5_VAE)
    assert not is_original_vae_config(dict(build_tiny_vae().config))
    cfg = translate_vae_config(ORIGINAL_V5_VAE)
    assert cfg["down_block_types"][0] == "SpatialDownBlock3D" and len(cfg["down_block_types"]) == 4
    assert not set(cfg) & {"ch", "cache_mag_vae", "mini_batch_encoder", "use_tiling"}
    vae = AutoencoderKLMagvit.from_config(cfg)
    assert vae.state_dict().keys() == build_tiny_vae().state_dict().keys()
    # Missing keys take the original defaults.
    bare = translate_vae_config({"ch": 4, "ch_mult": [1, 2], "down_block_types": ["SpatialDownBlock3D"] * 2,
                                 "up_block_types": ["SpatialUpBlock3D"] * 2})
    assert bare["block_out_channels"] == [4, 8] and bare["latent_channels"] == 4
    assert bare["scaling_factor"] == 0.1825 and bare["spatial_group_norm"] is False
    with pytest.raises(ValueError, match="supports only"):
        translate_vae_config(dict(ORIGINAL_V5_VAE, down_block_types=["DownBlock3D"] * 4))


def test_writers_round_trip_through_translation():
    t = dict(build_tiny_transformer("v5").config)
    back = translate_transformer_config(original_v5_transformer_config(t))
    for key in ("num_layers", "mmdit_layers", "text_embed_dim", "text_embed_dim_t5", "in_channels", "time_embed_dim"):
        assert back[key] == t[key], key
    v = dict(build_tiny_vae().config)
    back = translate_vae_config(original_v5_vae_config(v))
    for key in ("block_out_channels", "latent_channels", "scaling_factor", "down_block_types", "up_block_types"):
        assert list(back[key]) == list(v[key]) if isinstance(v[key], (list, tuple)) else back[key] == v[key], key


@pytest.fixture(scope="module")
def original_folder(tiny_models, tmp_path_factory):
    """The tiny V5 folder rewritten with original-format configs (and original transformer keys)."""
    folder = tmp_path_factory.mktemp("orig") / "EasyAnimateV5-tiny-original"
    shutil.copytree(tiny_models["v5"], folder)
    (folder / "transformer" / "config.json").write_text(json.dumps(ORIGINAL_V5_TRANSFORMER, indent=2))
    (folder / "vae" / "config.json").write_text(json.dumps(ORIGINAL_V5_VAE, indent=2))
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    if not any(".attn2." in k for k in state):
        state = convert_diffusers_state_dict(state)
    save_file(state, str(weights))
    return folder


def test_original_folder_loads_strictly_with_the_same_weights(tiny_models, original_folder):
    reference = load_pipe(tiny_models["v5"], "fp32", "none")
    pipe = load_pipe(original_folder, "fp32", "none")
    assert pipe.transformer.config.enable_text_attention_mask is False
    for name in ("transformer", "vae"):
        ref, got = getattr(reference, name).state_dict(), getattr(pipe, name).state_dict()
        assert ref.keys() == got.keys(), name
        for k in ref:
            assert torch.equal(ref[k], got[k]), (name, k)
    video = sample_video(EasyAnimateModel(pipe), SampleRequest("a cat", seed=1, width=32, height=32, frames=5, steps=2))
    assert video.shape == (5, 32, 32, 3) and torch.isfinite(video).all()


@pytest.fixture(scope="module")
def diffusers_folder(tiny_models, tmp_path_factory):
    """The tiny V5 folder rewritten in diffusers' format (keys and configs; text mask on)."""
    folder = tmp_path_factory.mktemp("diffusers") / "EasyAnimateV5-tiny-diffusers"
    shutil.copytree(tiny_models["v5"], folder)
    build_tiny_transformer("v5").save_pretrained(folder / "transformer", safe_serialization=True)
    build_tiny_vae().save_pretrained(folder / "vae", safe_serialization=True)
    return folder


def test_v5_text_encoding_follows_the_transformers_mask_flag(diffusers_folder, original_folder):
    masked = load_pipe(diffusers_folder, "fp32", "none")  # diffusers-format config: mask on (default)
    unmasked = load_pipe(original_folder, "fp32", "none")  # official V5 setting: mask off
    prompts = ["a cat", "a dog running on the beach at sunset"]
    a, b = encode_prompts(masked, prompts), encode_prompts(unmasked, prompts)
    assert a.embeds.shape == b.embeds.shape == (2, min(masked.tokenizer.model_max_length, 256), BERT_WIDTH)
    # Without the mask the encoders also attend to padding: the embeddings differ...
    assert not torch.allclose(a.embeds, b.embeds) and not torch.allclose(a.embeds_t5, b.embeds_t5)
    # ...and equal a direct unmasked call, which is what EasyAnimate's V5 pipeline does.
    ids = unmasked.tokenizer(prompts, padding="max_length", max_length=b.embeds.shape[1], truncation=True,
                             return_tensors="pt").input_ids
    with torch.no_grad():
        direct = unmasked.text_encoder(input_ids=ids)[0]
    assert torch.allclose(b.embeds, direct, atol=1e-6)


def test_unsupported_original_config_names_the_file(tiny_models, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_models["v5"], folder)
    (folder / "transformer" / "config.json").write_text(json.dumps(dict(ORIGINAL_V5_TRANSFORMER, swa_layers=[1])))
    with pytest.raises(ModelFolderError, match=r"transformer.config\.json.*sliding-window"):
        load_pipe(folder, "fp32", "none")
