"""Issue 9 (reliability), plain Python: interrupts in reward batches and sampling steps, LoRA depth
and partial files, the reward input contract, unreadable files, confined shard indexes, LoRA /
cfg / weight values, hostile configs and right padding for Qwen2-VL."""

import json
import logging
import math
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from easyanimate_reward.easyanimate.cancel import cancel_check
from easyanimate_reward.easyanimate.loading import ModelFolderError, detect_layout, load_pipe
from easyanimate_reward.easyanimate.lora_format import LoraMismatchError, load_lora_file, save_lora_file, weights_from_tensors
from easyanimate_reward.reward.base import WeightedReward
from easyanimate_reward.reward.registry import load_reward, write_tiny_reward_models
from easyanimate_reward.reward.scoring import score_images
from easyanimate_reward.reward.simple import SaturationReward

from test_lora import linears, random_lora, tiny_transformer, write_official
from test_training_reliability import CountingReward


BLOCKS = "easyanimate_reward.transformer_blocks"  # metadata: depth of the model a pack LoRA was made for


class Stop(Exception):
    pass


def stop_after(calls: list, n: int):
    """A cancel check that raises from its n-th call on (n = 1: at the first check)."""
    def check():
        calls.append(1)
        if len(calls) >= n:
            raise Stop()
    return check


# ---------------------------------------------------------------------------------------------- item 5

def test_interrupt_during_scoring_stops_before_the_next_batch():
    reward, calls = CountingReward(), []
    images = torch.rand(10, 8, 8, 3)
    with cancel_check(stop_after(calls, 2)), pytest.raises(Stop):
        score_images(reward, images, "p", batch_size=2)  # 5 batches
    assert reward.calls == 1, f"{reward.calls} batches ran after the interrupt was requested"


def test_interrupt_during_sampling_stops_before_the_next_step(tiny_models):
    from easyanimate_reward.easyanimate.model import EasyAnimateModel
    from easyanimate_reward.easyanimate.sampling import SampleRequest, sample_video

    pipe = load_pipe(tiny_models["v5.1"], "fp32", "none")
    steps = []
    handle = pipe.transformer.register_forward_hook(lambda *a: steps.append(1))
    calls = []
    try:
        with cancel_check(stop_after(calls, 3)), pytest.raises(Stop):
            sample_video(EasyAnimateModel(pipe), SampleRequest("a cat", width=32, height=32, frames=5, steps=8))
    finally:
        handle.remove()
    assert len(steps) == 2, f"{len(steps)} transformer steps ran; the interrupt came before step 3"


# ---------------------------------------------------------------------------------------------- item 7

def shallow_and_deep():
    deep = tiny_transformer()  # 2 blocks
    from diffusers import EasyAnimateTransformer3DModel

    torch.manual_seed(0)
    shallow = EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=33, out_channels=16, patch_size=2,
        num_layers=1, mmdit_layers=2, time_embed_dim=32, text_embed_dim=32, text_embed_dim_t5=24)
    return shallow, deep


def test_lora_made_for_a_shallower_model_of_the_same_width_is_refused(tmp_path):
    shallow, deep = shallow_and_deep()
    file = write_official(tmp_path / "shallow.safetensors", random_lora(shallow))
    with pytest.raises(LoraMismatchError, match="made for 1 blocks, model has 2"):
        load_lora_file(file, deep)
    assert load_lora_file(file, shallow).modules  # the model it was made for takes it


def test_genuine_partial_lora_is_accepted_and_logs_what_it_touches(tmp_path, caplog):
    _, deep = shallow_and_deep()
    tensors = {p: t for p, t in random_lora(deep).items() if p.endswith("attn1.to_q")}
    file = write_official(tmp_path / "partial.safetensors", tensors)
    with caplog.at_level(logging.INFO, logger="easyanimate_reward.easyanimate.lora_format"):
        weights = load_lora_file(file, deep)
    assert set(weights.modules) == set(tensors)
    text = caplog.text
    assert "partial LoRA" in text and f"touches {len(tensors)} of {len(linears(deep))} modules" in text, text
    assert "blocks 0-1 of 2" in text and "attn1.to_q" in text, text


def test_pack_written_lora_is_judged_by_its_metadata(tmp_path):
    shallow, deep = shallow_and_deep()
    # Made by the pack on the 1-block model: it says so, and the 2-block model refuses it.
    made = save_lora_file(tmp_path / "made1.safetensors", weights_from_tensors(random_lora(shallow), 2.0),
                          dtype=torch.float32, metadata={BLOCKS: "1"})
    with pytest.raises(LoraMismatchError, match="made for 1 blocks, model has 2"):
        load_lora_file(made, deep)
    # Written by the pack on purpose for block 0 only of the 2-block model (every module kind of
    # block 0): the heuristic for foreign files would call it shallow; its metadata says otherwise.
    block0 = {p: t for p, t in random_lora(deep).items() if p.startswith("transformer_blocks.0.")}
    partial = save_lora_file(tmp_path / "block0.safetensors", weights_from_tensors(block0, 2.0),
                             dtype=torch.float32, metadata={BLOCKS: "2"})
    assert set(load_lora_file(partial, deep).modules) == set(block0)
    foreign = write_official(tmp_path / "block0_foreign.safetensors", block0)
    with pytest.raises(LoraMismatchError, match="made for 1 blocks, model has 2"):
        load_lora_file(foreign, deep)
    # A pack file whose content no longer matches its declared targets (edited, cut) is refused.
    from safetensors import safe_open

    with safe_open(str(partial), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cut = {k: v for k, v in state.items() if "attn1_to_q" not in k}
    save_file(cut, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(LoraMismatchError, match="says it targets"):
        load_lora_file(tmp_path / "cut.safetensors", deep)


# ---------------------------------------------------------------------------------------------- item 11

@pytest.fixture(scope="module")
def tiny_reward_folder(tmp_path_factory):
    return write_tiny_reward_models(tmp_path_factory.mktemp("rewards"))


def test_rewards_refuse_frames_outside_0_1_uint8_and_empty_batches(tiny_reward_folder):
    for reward in (SaturationReward(), load_reward("hps_v2.1", tiny_reward_folder)):
        good = torch.rand(2, 3, 16, 16)
        assert torch.isfinite(reward(good, "a cat")).all()
        for frames, message in ((good * 255, r"\[0, 1\].*divide by 255"),
                                (good * 2 - 1, r"\[0, 1\].*\[-1, 1\]"),
                                ((good * 255).to(torch.uint8), "uint8.*divide uint8 images by 255"),
                                (torch.rand(0, 3, 16, 16), "batch is empty")):
            with pytest.raises(ValueError, match=message):
                reward(frames, "a cat")


def test_prompt_conditioned_rewards_refuse_prompts_none(tiny_reward_folder):
    frames = torch.rand(2, 3, 16, 16)
    for kind in ("hps_v2.1", "pickscore", "mps"):
        reward = load_reward(kind, tiny_reward_folder)
        with pytest.raises(ValueError, match="scores frames against their prompt"):
            reward(frames, None)
        combined = WeightedReward([(SaturationReward(), 1.0), (reward, 0.5)])
        with pytest.raises(ValueError, match="scores frames against their prompt"):
            combined(frames, None)
    assert torch.isfinite(SaturationReward()(frames, None)).all()  # prompt-free rewards need none


def test_reward_value_checks_are_skipped_under_fake_tensors(tiny_reward_folder):
    from torch._subclasses.fake_tensor import FakeTensorMode

    reward = SaturationReward()
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = reward(torch.empty(2, 3, 16, 16), "a cat")  # no data to read: the range check is skipped
        assert out.shape == (2,)
        with pytest.raises(ValueError, match="uint8"):  # dtype checks read no data and still apply
            reward(torch.empty(2, 3, 16, 16, dtype=torch.uint8), "a cat")


# ---------------------------------------------------------------------------------------------- item 12

def test_unreadable_text_encoder_tokenizer_and_reward_files_are_named(tiny_models, tiny_reward_folder, tmp_path):
    cases = [("v5", "text_encoder/model.safetensors", "truncate", r"text_encoder.model\.safetensors.*text encoder"),
             ("v5", "text_encoder_2/model.safetensors", "empty", r"text_encoder_2.model\.safetensors is empty"),
             ("v5", "tokenizer/tokenizer.json", "garbage", r"tokenizer.tokenizer\.json is not valid JSON.*tokenizer"),
             ("v5", "tokenizer_2/spiece.model", "empty", r"tokenizer_2.spiece\.model is empty"),
             ("v5.1", "tokenizer/tokenizer.json", "truncate", r"tokenizer.tokenizer\.json is not valid JSON"),
             ("v5.1", "text_encoder/model.safetensors", "garbage", r"text_encoder.model\.safetensors.*Qwen2VL")]
    for version, rel, how, message in cases:
        folder = tmp_path / f"{version}-{how}-{rel.replace('/', '_')}"
        shutil.copytree(tiny_models[version], folder)
        damage(folder / rel, how)
        with pytest.raises(ModelFolderError, match=message):
            load_pipe(folder, "fp32", "none")

    for kind, rel in (("hps_v2.1", "HPS_v2.1_compressed.pt"), ("aesthetic_v2", "aesthetic/sac+logos+ava1-l14-linearMSE.pth"),
                      ("aesthetic_v2", "aesthetic/clip-vit-large-patch14/model.safetensors"),
                      ("mps", "MPS_overall.pth"), ("pickscore", "PickScore_v1/model.safetensors"),
                      ("pickscore", "PickScore_v1/config.json")):
        folder = tmp_path / f"reward-{kind}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(tiny_reward_folder, folder)
        target = folder / rel
        converted = target.with_suffix(".safetensors")
        if converted != target and converted.exists():
            converted.unlink()  # a converted copy beside it would be preferred
        damage(target, "truncate")
        with pytest.raises(ValueError, match=rf"{re.escape(target.name)}.*(corrupt or incomplete|not valid JSON)"):
            load_reward(kind, folder)


def damage(path, how):
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": b"<html>404</html>"}[how])


# ---------------------------------------------------------------------------------------------- item 13

@pytest.mark.parametrize("bad", ["/etc/x.safetensors", "../../x.safetensors", "..\\x.safetensors", "C:/x.safetensors"])
def test_shard_indexes_naming_files_outside_their_folder_are_refused(tiny_models, tmp_path, bad):
    outside = tmp_path / "x.safetensors"
    folder = tmp_path / "m"
    shutil.copytree(tiny_models["v5"], folder)
    for sub, stem in (("transformer", "diffusion_pytorch_model"), ("text_encoder", "model")):
        target = folder / sub
        weights = target / f"{stem}.safetensors"
        shutil.copy(weights, outside)
        keys = json.loads(weights.read_bytes()[8:8 + int.from_bytes(weights.read_bytes()[:8], "little")])
        weights.unlink()
        index = {"metadata": {}, "weight_map": {k: bad for k in keys if k != "__metadata__"}}
        (target / f"{stem}.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(ModelFolderError, match="outside"):
            load_pipe(folder, "fp32", "none")
        shutil.rmtree(target)
        shutil.copytree(tiny_models["v5"] / sub, target)


# ---------------------------------------------------------------------------------------------- item 14

def test_lora_files_with_rank_0_or_non_finite_values_are_refused(tmp_path):
    model = tiny_transformer()
    good = random_lora(model)
    path0 = next(iter(good))
    cases = {
        "rank 0": ({**good, path0: (good[path0][0][:0], good[path0][1][:, :0])}, 2.0),
        "NaN/inf values in its down": ({**good, path0: (good[path0][0] * math.nan, good[path0][1])}, 2.0),
        "NaN/inf values in its up": ({**good, path0: (good[path0][0], good[path0][1] * math.inf)}, 2.0),
        "alpha nan": (good, math.nan),
        "alpha inf": (good, math.inf),
    }
    for message, (tensors, alpha) in cases.items():
        file = write_official(tmp_path / "bad.safetensors", tensors, alpha=alpha)
        with pytest.raises(LoraMismatchError, match=message):
            load_lora_file(file, model)


def test_cfg_nan_is_refused_before_any_work(tiny_models):
    from easyanimate_reward.easyanimate.model import EasyAnimateModel
    from easyanimate_reward.easyanimate.sampling import SampleRequest, sample_video

    pipe = load_pipe(tiny_models["v5"], "fp32", "none")
    calls = []
    handle = pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        for cfg in (math.nan, math.inf):
            with pytest.raises(ValueError, match="cfg .*finite"):
                sample_video(EasyAnimateModel(pipe), SampleRequest("a cat", width=32, height=32, frames=5, steps=2,
                                                                   guidance_scale=cfg))
    finally:
        handle.remove()
    assert not calls, "the prompt was encoded before cfg was checked"


def test_reward_weights_must_be_finite():
    for weight in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="must be a finite number"):
            WeightedReward([(SaturationReward(), 1.0), (SaturationReward(), weight)])


# ---------------------------------------------------------------------------------------------- item 17

def test_scheduler_class_must_be_a_scheduler(tiny_models, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_models["v5"], folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    for bad in ("EasyAnimateTransformer3DModel", "DiffusionPipeline", "os", "__class__"):
        config = json.loads(config_path.read_text())
        config["_class_name"] = bad
        config_path.write_text(json.dumps(config))
        with pytest.raises(ModelFolderError, match="not a diffusers scheduler class"):
            detect_layout(folder)


@pytest.mark.parametrize("version,section,key,value", [
    ("v5", None, "num_hidden_layers", 3000),
    ("v5", None, "hidden_size", 4096),
    ("v5.1", "text_config", "num_hidden_layers", 3000),
    ("v5.1", "text_config", "intermediate_size", 1 << 20),
])
def test_hostile_text_encoder_config_is_refused_before_building(tiny_models, tmp_path, version, section, key, value):
    import transformers

    folder = tmp_path / "m"
    shutil.copytree(tiny_models[version], folder)
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    (config[section] if section else config)[key] = value
    if version == "v5.1" and key == "num_hidden_layers":
        config["text_config"]["layer_types"] = ["full_attention"] * value
    config_path.write_text(json.dumps(config))
    cls = transformers.BertModel if version == "v5" else transformers.Qwen2VLForConditionalGeneration
    built = []
    original = cls.__init__

    def spy(self, *args, **kwargs):
        built.append(torch.get_default_device().type)
        return original(self, *args, **kwargs)

    cls.__init__ = spy
    try:
        with pytest.raises(ModelFolderError, match="does not belong to these weights"):
            load_pipe(folder, "fp32", "none")
    finally:
        cls.__init__ = original
    assert all(device == "meta" for device in built), f"a real {cls.__name__} was built first: {built}"


# ---------------------------------------------------------------------------------------------- item 19

def test_qwen_prompts_are_padded_on_the_right_whatever_the_tokenizer_config_says(tiny_models, tmp_path):
    from easyanimate_reward.easyanimate.text import encode_prompts

    left = tmp_path / "left"
    shutil.copytree(tiny_models["v5.1"], left)
    config_path = left / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["padding_side"] = "left"
    config_path.write_text(json.dumps(config))
    right_pipe, left_pipe = load_pipe(tiny_models["v5.1"], "fp32", "none"), load_pipe(left, "fp32", "none")
    assert left_pipe.tokenizer.padding_side == "left"  # the folder really says left
    prompts = ["a cat", "a dog playing the piano in the rain"]
    expected, got = encode_prompts(right_pipe, prompts).embeds, encode_prompts(left_pipe, prompts).embeds
    assert torch.equal(got, expected), (got - expected).abs().max()
