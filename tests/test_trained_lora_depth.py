"""A LoRA the trainer writes names the depth of the model it was trained on, so the loader can
refuse it on a model of the same width but another depth (issue 9, item 7)."""

import pytest
from safetensors import safe_open

from easyanimate_reward.easyanimate.loading import load_pipe
from easyanimate_reward.easyanimate.lora_format import BLOCKS_KEY, LoraMismatchError, load_lora_file, save_lora_file
from easyanimate_reward.training.lora_layers import LoraLayers


def test_trained_lora_files_record_the_model_depth_and_are_judged_by_it(tiny_models, tmp_path):
    pipe = load_pipe(tiny_models["v5"], "fp32", "none", device="cpu")
    transformer = pipe.transformer
    layers = LoraLayers(transformer, rank=2, alpha=2.0)
    path = save_lora_file(tmp_path / "trained.safetensors", layers.to_weights())
    with safe_open(str(path), "pt") as f:
        assert f.metadata()[BLOCKS_KEY] == str(transformer.config.num_layers)
    assert load_lora_file(path, transformer).modules  # its own model takes it
    # The same file claiming one block more (as a LoRA of a deeper model would) is refused by name.
    deeper = layers.to_weights({BLOCKS_KEY: str(transformer.config.num_layers + 1)})
    other = save_lora_file(tmp_path / "deeper.safetensors", deeper)
    with pytest.raises(LoraMismatchError, match=f"made for {transformer.config.num_layers + 1} blocks"):
        load_lora_file(other, transformer)
