"""The tiny V5 and V5.1 models keep the published models' distinguishing text widths (V5: Bert 1024
and T5 2048 projections; V5.1: one Qwen2-VL 3584 projection), at tiny scale, so a LoRA made for one
version is refused on the other with a message naming the mismatch, as on the real models."""

import pytest

from easyanimate_reward.easyanimate.lora_format import LoraMismatchError, load_lora_file
from easyanimate_reward.easyanimate.tiny import BERT_WIDTH, QWEN_WIDTH, T5_WIDTH, build_tiny_transformer
from easyanimate_reward.tools.workflows import write_tiny_lora


def test_tiny_text_widths_keep_the_published_relations(tiny_models):
    from easyanimate_reward.easyanimate.loading import load_pipe

    assert (BERT_WIDTH, T5_WIDTH, QWEN_WIDTH) == (16, 32, 56)  # 1024 : 2048 : 3584
    v5, v51 = build_tiny_transformer("v5"), build_tiny_transformer("v5.1")
    assert (v5.text_proj.in_features, v5.text_proj_t5.in_features) == (BERT_WIDTH, T5_WIDTH)
    assert v51.text_proj.in_features == QWEN_WIDTH and v51.text_proj_t5 is None
    # The model folders' encoders really have those widths (the loader checks them against the transformer).
    pipe = load_pipe(tiny_models["v5.1"], "fp32", "none")
    assert pipe.text_encoder.config.text_config.hidden_size == QWEN_WIDTH
    pipe = load_pipe(tiny_models["v5"], "fp32", "none")
    assert (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.d_model) == (BERT_WIDTH, T5_WIDTH)


def test_a_v51_lora_is_refused_on_tiny_v5(tmp_path):
    path = write_tiny_lora("v5.1", tmp_path / "v51.safetensors")
    assert load_lora_file(path, build_tiny_transformer("v5.1")).modules  # its own model takes it
    with pytest.raises(LoraMismatchError) as error:
        load_lora_file(path, build_tiny_transformer("v5"))
    message = str(error.value)
    assert "shapes differ" in message and f"text_proj: LoRA {QWEN_WIDTH}->" in message, message
    assert f"vs model {BERT_WIDTH}->" in message, message
    assert f"looks made for: width 32, 2 layers" in message and "no T5 projection" in message, message


def test_a_v5_lora_is_refused_on_tiny_v51(tmp_path):
    path = write_tiny_lora("v5", tmp_path / "v5.safetensors")
    assert load_lora_file(path, build_tiny_transformer("v5")).modules
    with pytest.raises(LoraMismatchError) as error:
        load_lora_file(path, build_tiny_transformer("v5.1"))
    message = str(error.value)
    assert "text_proj_t5" in message and "have no module in this model" in message, message
    assert f"text_proj: LoRA {BERT_WIDTH}->" in message and f"vs model {QWEN_WIDTH}->" in message, message
    assert f"T5 projection input {T5_WIDTH}" in message and "[EasyAnimate V5 (Bert + T5)]" in message, message
