"""Original EasyAnimate module paths <-> diffusers EasyAnimateTransformer3DModel paths."""

import pytest
import torch
from diffusers import EasyAnimateTransformer3DModel
from torch import nn

from easyanimate_reward.easyanimate.keymap import (
    convert_diffusers_state_dict,
    convert_original_state_dict,
    diffusers_to_original,
    is_original_state_dict,
    original_to_diffusers,
)
from easyanimate_reward.easyanimate.lora_format import flat_name_table


def tiny_transformer(seed=0):
    torch.manual_seed(seed)
    return EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=33, out_channels=16, patch_size=2,
        num_layers=2, mmdit_layers=2, time_embed_dim=32, text_embed_dim=32, text_embed_dim_t5=24,
    )


# The table from the reference, written out by hand (independent of keymap.py).
PINNED = {
    "transformer_blocks.1.attn2.to_q": "transformer_blocks.1.attn1.add_q_proj",
    "transformer_blocks.1.attn2.to_k": "transformer_blocks.1.attn1.add_k_proj",
    "transformer_blocks.1.attn2.to_v": "transformer_blocks.1.attn1.add_v_proj",
    "transformer_blocks.1.attn2.to_out.0": "transformer_blocks.1.attn1.to_add_out",
    "transformer_blocks.1.attn2.norm_q": "transformer_blocks.1.attn1.norm_added_q",
    "transformer_blocks.1.attn2.norm_k": "transformer_blocks.1.attn1.norm_added_k",
    "transformer_blocks.0.attn1.to_q": "transformer_blocks.0.attn1.to_q",
    "transformer_blocks.0.attn1.to_out.0": "transformer_blocks.0.attn1.to_out.0",
    "transformer_blocks.0.attn1.norm_k": "transformer_blocks.0.attn1.norm_k",
    "transformer_blocks.0.txt_ff.net.0.proj": "transformer_blocks.0.txt_ff.net.0.proj",
    "text_proj_t5": "text_proj_t5",
    "norm_out.linear": "norm_out.linear",
}


@pytest.mark.parametrize("original,diffusers", sorted(PINNED.items()))
def test_pinned_paths(original, diffusers):
    assert original_to_diffusers(original) == diffusers
    assert diffusers_to_original(diffusers) == original
    assert original_to_diffusers(original + ".weight") == diffusers + ".weight"
    assert diffusers_to_original(diffusers + ".bias") == original + ".bias"


def test_every_module_maps_to_an_existing_module_and_back():
    model = tiny_transformer()
    modules = dict(model.named_modules())
    originals = {diffusers_to_original(p) for p in modules if p}
    assert len(originals) == len(modules) - 1  # the mapping is one-to-one
    for original in originals:
        assert original_to_diffusers(original) in modules
        assert diffusers_to_original(original_to_diffusers(original)) == original
    # The text stream lives in attn2 in the original naming and nowhere else.
    attn2 = sorted(p for p in originals if ".attn2." in p)
    assert attn2 == sorted(f"transformer_blocks.{i}.attn2.{c}" for i in range(2)
                           for c in ("to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k"))
    assert not any("add_q_proj" in p or "to_add_out" in p or "norm_added" in p for p in originals)


def test_full_original_checkpoint_loads_strictly():
    model = tiny_transformer(seed=1)
    original = convert_diffusers_state_dict(model.state_dict())
    assert is_original_state_dict(original) and not is_original_state_dict(model.state_dict())
    assert "transformer_blocks.0.attn2.to_out.0.weight" in original
    original["clip_proj.0.weight"] = torch.zeros(2, 2)  # original-only module: dropped
    converted = convert_original_state_dict(original)
    fresh = tiny_transformer(seed=2)
    fresh.load_state_dict(converted, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_flat_names_resolve_without_guessing():
    model = tiny_transformer()
    table = flat_name_table(model)
    linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 34 and set(table.values()) == set(linears)
    assert table["transformer_blocks_0_attn2_to_out_0"] == "transformer_blocks.0.attn1.to_add_out"
    assert table["transformer_blocks_0_attn1_to_add_out"] == "transformer_blocks.0.attn1.to_add_out"
    assert table["transformer_blocks_1_txt_ff_net_0_proj"] == "transformer_blocks.1.txt_ff.net.0.proj"
    assert table["text_proj_t5"] == "text_proj_t5" and table["text_proj"] == "text_proj"
    assert table["norm_out_linear"] == "norm_out.linear"
    assert table["time_embedding_linear_2"] == "time_embedding.linear_2"
