"""Reward LoRAs: official/PEFT files, fused and unfused patching, exact restore, merged saves."""

import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import EasyAnimateTransformer3DModel
from safetensors.torch import load_file, save_file
from torch import nn

from easyanimate_reward.easyanimate.keymap import convert_diffusers_state_dict
from easyanimate_reward.easyanimate.lora_format import (
    LoraMismatchError,
    NotALoraError,
    load_lora_file,
    save_lora_file,
    text_encoder_weights,
    weights_from_tensors,
)
from easyanimate_reward.easyanimate.lora_merge import merge_into_base, merged_model_destination, save_merged_model
from easyanimate_reward.easyanimate.lora_patch import LoraPatcher, get_patcher
from easyanimate_reward.easyanimate.memory import quantize_linears_to_float8
from easyanimate_reward.easyanimate.model import AppliedLora, EasyAnimateModel, EasyAnimatePipe

RANK, ALPHA = 4, 2.0


def tiny_transformer(heads=2, text_dim=32, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = EasyAnimateTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=16, in_channels=33, out_channels=16, patch_size=2,
        num_layers=2, mmdit_layers=2, time_embed_dim=32, text_embed_dim=text_dim, text_embed_dim_t5=24,
    )
    with torch.no_grad():  # zero-initialised layers would hide wrong patches
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return nn.Module.to(model, dtype).eval()  # nn.Module.to: diffusers' override warns about fp32 modules


def linears(model):
    return {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear)}


# Original EasyAnimate names of the text-stream attention, written out by hand so that the test
# does not depend on keymap.py.
ORIGINAL_NAMES = {"attn1.add_q_proj": "attn2.to_q", "attn1.add_k_proj": "attn2.to_k",
                  "attn1.add_v_proj": "attn2.to_v", "attn1.to_add_out": "attn2.to_out.0"}


def official_name(path):
    for new, old in ORIGINAL_NAMES.items():
        path = path.replace(new, old)
    return "lora_unet__" + path.replace(".", "_")


def random_lora(model, seed=1, rank=RANK):
    """{diffusers path: (down, up)} on every Linear, as bf16 (what official files hold)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, m in linears(model).items():
        down = (torch.randn(rank, m.in_features, generator=g) * 0.3).bfloat16()
        up = (torch.randn(m.out_features, rank, generator=g) * 0.3).bfloat16()
        out[path] = (down, up)
    return out


def write_official(file, tensors, alpha=ALPHA, extra=None):
    state = {}
    for path, (down, up) in tensors.items():
        name = official_name(path)
        state[f"{name}.lora_down.weight"] = down
        state[f"{name}.lora_up.weight"] = up
        state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
    state.update(extra or {})
    save_file(state, str(file))
    return file


def reference_weight(base, down, up, strength, alpha=ALPHA):
    """W + s * (alpha / r) * up @ down, in float64."""
    return base.double() + strength * (alpha / down.shape[0]) * (up.double() @ down.double())


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise(model, state):
    for key, value in model.state_dict().items():
        assert value.dtype == state[key].dtype and torch.equal(value.view(torch.uint8), state[key].view(torch.uint8)), key


def apply(patcher, model, weights, strength, mode="fused"):
    return patcher.sync(model, (AppliedLora("lora", weights, strength),), mode)


def model_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g),
        inpaint_latents=torch.randn(1, 17, 2, 8, 8, generator=g),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        encoder_hidden_states_t5=torch.randn(1, 3, 24, generator=g),
    )


def run(model, dtype=torch.float32):
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model_inputs().items()}
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0].float()


@pytest.fixture()
def official(tmp_path):
    model = tiny_transformer()
    tensors = random_lora(model)
    return model, tensors, write_official(tmp_path / "reward.safetensors", tensors)


# ----------------------------------------------------------------------------------------------


def test_official_file_patches_every_linear_exactly(official):
    model, tensors, file = official
    weights = load_lora_file(file, model)
    assert set(weights.modules) == set(linears(model)) and len(weights.modules) == 34
    before = snapshot(model)
    patcher = LoraPatcher()
    apply(patcher, model, weights, 0.7)
    for path, m in linears(model).items():
        down, up = tensors[path]
        ref = reference_weight(before[path + ".weight"], down, up, 0.7)
        torch.testing.assert_close(m.weight.double(), ref, rtol=1e-6, atol=1e-6)
        assert not torch.equal(m.weight, before[path + ".weight"])
        assert torch.equal(m.bias, before[path + ".bias"])
    assert torch.equal(model.proj.weight, before["proj.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strength_change_then_remove_is_bitwise(official, dtype):
    model, tensors, file = official
    model = nn.Module.to(model, dtype)
    weights = load_lora_file(file, model)
    before = snapshot(model)
    patcher = LoraPatcher()
    apply(patcher, model, weights, 0.7)
    apply(patcher, model, weights, 0.3)
    at_03 = snapshot(model)
    for path in tensors:  # bf16: the float64 reference rounded once, within one rounding step
        ref = reference_weight(before[path + ".weight"], *tensors[path], 0.3)
        tol = 1e-6 if dtype == torch.float32 else 2 ** -8
        assert (model.get_submodule(path).weight.double() - ref).abs().max() <= tol * ref.abs().max()
    assert patcher.backup_bytes == sum(m.weight.numel() * m.weight.element_size() for m in linears(model).values())
    patcher.sync(model, ())
    assert_bitwise(model, before)
    assert not patcher.is_patched and patcher.backup_bytes == 0  # backups live only while patched
    # 0.7 -> 0.3 gives the very bits of a direct 0.3 (recomputed from the backup, never subtracted)
    apply(LoraPatcher(), model, weights, 0.3)
    assert_bitwise(model, at_03)


def test_hundred_strength_changes_do_not_drift(official):
    model, _, file = official
    model = nn.Module.to(model, torch.bfloat16)
    weights = load_lora_file(file, model)
    before = snapshot(model)
    patcher = LoraPatcher()
    rng = random.Random(0)
    for _ in range(100):
        apply(patcher, model, weights, rng.uniform(-2, 2))
    apply(patcher, model, weights, 0.45)
    last = snapshot(model)
    patcher.restore(model)
    assert_bitwise(model, before)
    apply(LoraPatcher(), model, weights, 0.45)
    assert_bitwise(model, last)


def test_float8_weights_fused_and_unfused(official):
    model, tensors, file = official
    model = nn.Module.to(model, torch.bfloat16)
    quantize_linears_to_float8(model, skip_patterns=())  # every Linear in fp8: this test is about fp8 patching
    weights = load_lora_file(file, model)
    before = snapshot(model)
    base_out = run(model, torch.bfloat16)
    patcher = LoraPatcher()
    apply(patcher, model, weights, 0.7)
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    for path, (down, up) in tensors.items():
        weight = model.get_submodule(path).weight
        assert weight.dtype == torch.float8_e4m3fn
        ref = reference_weight(before[path + ".weight"].float(), down, up, 0.7).clamp(-fp8_max, fp8_max)
        expected = ref.float().to(torch.float8_e4m3fn).double()
        # fp32 vs fp64 accumulation can only flip a rounding tie: at most one fp8 step (1/8 relative)
        assert ((weight.double() - expected).abs() <= expected.abs() / 8 + 2 ** -9).all(), path
    fused_out = run(model, torch.bfloat16)
    apply(patcher, model, weights, 0.2)
    patcher.restore(model)
    assert_bitwise(model, before)
    assert torch.equal(run(model, torch.bfloat16), base_out)
    # unfused keeps the fp8 weights untouched and adds the update exactly at activation precision
    apply(patcher, model, weights, 0.7, mode="unfused")
    assert_bitwise(model, before)
    unfused_out = run(model, torch.bfloat16)
    assert not torch.equal(unfused_out, base_out)
    assert (unfused_out - fused_out).abs().mean() < (fused_out - base_out).abs().mean()
    patcher.restore(model)
    assert torch.equal(run(model, torch.bfloat16), base_out)


def test_unfused_matches_fused(official):
    model, _, file = official
    weights = load_lora_file(file, model)
    before = snapshot(model)
    base_out = run(model)
    patcher = LoraPatcher()
    apply(patcher, model, weights, 0.7, mode="fused")
    fused_out = run(model)
    apply(patcher, model, weights, 0.7, mode="unfused")
    assert_bitwise(model, before)  # switching mode restored the weights; hooks carry the LoRA
    unfused_out = run(model)
    assert (fused_out - base_out).abs().max() > 1e-2
    torch.testing.assert_close(unfused_out, fused_out, rtol=0, atol=2e-6)
    patcher.restore(model)
    assert torch.equal(run(model), base_out)


def test_stack_of_two_and_per_lora_mode(official, tmp_path):
    model, tensors, file = official
    other = write_official(tmp_path / "other.safetensors", random_lora(model, seed=7), alpha=4.0)
    a, b = load_lora_file(file, model), load_lora_file(other, model)
    before = snapshot(model)
    patcher = LoraPatcher()
    stack = (AppliedLora("a", a, 0.5), AppliedLora("b", b, -0.25))
    patcher.sync(model, stack)
    b_tensors = random_lora(model, seed=7)
    for path in tensors:
        ref = reference_weight(before[path + ".weight"], *tensors[path], 0.5)
        ref = ref + (-0.25) * (4.0 / RANK) * (b_tensors[path][1].double() @ b_tensors[path][0].double())
        torch.testing.assert_close(model.get_submodule(path).weight.double(), ref, rtol=1e-6, atol=1e-6)
    fused_out = run(model)
    # One LoRA fused, the other as hooks, chosen per LoRA (what the node's mode input does).
    mixed = (AppliedLora("a", a, 0.5), AppliedLora("b", b.with_mode("unfused"), -0.25))
    patcher.sync(model, mixed)
    torch.testing.assert_close(run(model), fused_out, rtol=0, atol=2e-6)
    patcher.sync(model, stack, "unfused")  # both as hooks: one concatenated rank-8 adapter per Linear
    assert_bitwise(model, before)
    torch.testing.assert_close(run(model), fused_out, rtol=0, atol=2e-6)
    patcher.sync(model, ())
    assert_bitwise(model, before)


def test_sync_is_idempotent_and_cheap(official):
    model, _, file = official
    weights = load_lora_file(file, model)
    pipe = SimpleNamespace(lora_patcher=None, placement=None)
    patcher = get_patcher(pipe)
    assert get_patcher(pipe) is patcher
    base = EasyAnimateModel(pipe=pipe)
    with_lora = base.with_lora(weights, 0.7, "reward")
    assert base.loras == () and len(with_lora.loras) == 1  # the incoming model never changes
    assert patcher.sync(model, with_lora.loras, "fused")
    work = patcher.work_done
    assert not patcher.sync(model, with_lora.loras, "fused")
    assert not patcher.sync(model, base.with_lora(weights, 0.7, "again").loras, "fused")
    assert patcher.work_done == work
    assert patcher.sync(model, base.with_lora(weights.with_mode("fused"), 0.7, "view").loras)
    assert patcher.work_done == work  # a mode view shares the tensors: per-weight checks skip all
    with pytest.raises(ValueError, match="another transformer"):
        patcher.sync(tiny_transformer(), with_lora.loras)


def test_peft_files_give_the_same_weights(official, tmp_path):
    model, tensors, file = official
    patcher = LoraPatcher()
    apply(patcher, model, load_lora_file(file, model), 0.7)
    kohya_state = snapshot(model)
    patcher.restore(model)

    folder = tmp_path / "peft"
    folder.mkdir()
    peft = {}
    for path, (down, up) in tensors.items():
        peft[f"base_model.model.{path}.lora_A.weight"] = down
        peft[f"base_model.model.{path}.lora_B.weight"] = up
    save_file(peft, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA}))
    weights = load_lora_file(folder / "adapter_model.safetensors", model)
    assert weights.format == "peft"
    apply(patcher, model, weights, 0.7)
    assert_bitwise(model, kohya_state)
    patcher.restore(model)

    diffusers_style = {}
    for path, (down, up) in tensors.items():
        diffusers_style[f"transformer.{path}.lora_A.weight"] = down
        diffusers_style[f"transformer.{path}.lora_B.weight"] = up
        diffusers_style[f"transformer.{path}.alpha"] = torch.tensor(ALPHA)
    save_file(diffusers_style, str(tmp_path / "diffusers_style.safetensors"))
    apply(patcher, model, load_lora_file(tmp_path / "diffusers_style.safetensors", model), 0.7)
    assert_bitwise(model, kohya_state)


def test_save_writes_the_official_format_and_reloads(official, tmp_path):
    model, tensors, file = official
    te = {"lora_te_encoder_layer_0_attention_self_query.lora_down.weight": torch.ones(RANK, 32).bfloat16(),
          "lora_te_encoder_layer_0_attention_self_query.lora_up.weight": torch.ones(32, RANK).bfloat16(),
          "lora_te_encoder_layer_0_attention_self_query.alpha": torch.tensor(ALPHA).bfloat16()}
    file = write_official(tmp_path / "with_te.safetensors", tensors, extra=te)
    weights = load_lora_file(file, model)
    assert list(weights.text_encoder_modules) == ["encoder_layer_0_attention_self_query"]
    # the lora_te_ part resolves onto a Bert text encoder and patches it like the transformer
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64)).eval()
    query = bert.encoder.layer[0].attention.self.query
    base_query = query.weight.detach().clone()
    te_weights = text_encoder_weights(weights, bert)
    assert list(te_weights.modules) == ["encoder.layer.0.attention.self.query"]
    te_patcher = LoraPatcher()
    te_patcher.sync(bert, (AppliedLora("te", te_weights, 0.5),))
    expected = reference_weight(base_query, torch.ones(RANK, 32), torch.ones(32, RANK), 0.5)
    torch.testing.assert_close(query.weight.double(), expected)
    te_patcher.restore(bert)
    assert torch.equal(query.weight, base_query)
    out = save_lora_file(tmp_path / "saved.safetensors", weights, metadata={"note": "test"})
    state = load_file(str(out))
    original = load_file(str(file))
    assert set(state) == set(original)  # same keys: lora_unet__..., attn2_* names, alpha, lora_te_
    assert "lora_unet__transformer_blocks_0_attn2_to_out_0.lora_up.weight" in state
    assert not any("add_q_proj" in k or "to_add_out" in k for k in state)
    for key in state:
        assert state[key].dtype == torch.bfloat16 and torch.equal(state[key], original[key]), key
    assert not list(tmp_path.glob("*.tmp"))


def test_trainer_tensors_export(official, tmp_path):
    model, tensors, file = official
    trained = {path: (down.float().requires_grad_(), up.float()) for path, (down, up) in tensors.items()}
    weights = weights_from_tensors(trained, alpha=ALPHA)
    with torch.no_grad():  # later optimiser steps must not leak into the exported weights
        next(iter(trained.values()))[0].add_(1.0)
    save_lora_file(tmp_path / "trained.safetensors", weights)
    reloaded = load_lora_file(tmp_path / "trained.safetensors", model)
    official_weights = load_lora_file(file, model)
    for path, lora in official_weights.modules.items():
        assert torch.equal(reloaded.modules[path].down, lora.down) and torch.equal(reloaded.modules[path].up, lora.up)
        assert reloaded.modules[path].alpha == ALPHA


def test_wrong_model_files_fail_clearly(official, tmp_path):
    model, _, _ = official
    wide = tiny_transformer(heads=3)  # width 48 instead of 32 (like 7b vs 12b)
    write_official(tmp_path / "wide.safetensors", random_lora(wide))
    with pytest.raises(LoraMismatchError) as e:
        load_lora_file(tmp_path / "wide.safetensors", model)
    msg = str(e.value)
    assert "1 of 34" in msg and "shapes differ" in msg and "width 48" in msg and "width 32" in msg

    other_text = tiny_transformer(text_dim=40)  # V5 vs V5.1: text_proj input width differs
    write_official(tmp_path / "text.safetensors", random_lora(other_text))
    with pytest.raises(LoraMismatchError) as e:
        load_lora_file(tmp_path / "text.safetensors", model)
    msg = str(e.value)
    assert "33 of 34" in msg and "text_proj: LoRA 40->32 vs model 32->32" in msg and "text_proj input 40" in msg

    save_file(model.state_dict(), str(tmp_path / "full.safetensors"))
    with pytest.raises(NotALoraError, match="full transformer checkpoint"):
        load_lora_file(tmp_path / "full.safetensors", model)

    save_file({"foo": torch.zeros(3), "bar.baz": torch.ones(2, 2)}, str(tmp_path / "random.safetensors"))
    with pytest.raises(NotALoraError, match="not a LoRA"):
        load_lora_file(tmp_path / "random.safetensors", model)

    unet = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}
    save_file(unet, str(tmp_path / "sd.safetensors"))
    with pytest.raises(LoraMismatchError, match="another architecture"):
        load_lora_file(tmp_path / "sd.safetensors", model)


def _model_folder(root: Path, model: nn.Module, original_keys=False) -> Path:
    folder = root / "src_model"
    model.save_pretrained(folder / "transformer", safe_serialization=True)
    if original_keys:
        weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        save_file(convert_diffusers_state_dict(load_file(str(weights))), str(weights))
    (folder / "vae").mkdir()
    (folder / "vae" / "config.json").write_text("{}")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("original_keys", [False, True])
def test_save_merged_model_reloads(official, tmp_path, original_keys):
    model, _, file = official
    weights = load_lora_file(file, model)
    folder = _model_folder(tmp_path, model, original_keys)
    pipe = EasyAnimatePipe(folder=str(folder), version="v5", transformer=model, vae=None, text_encoder=None,
                           tokenizer=None, text_encoder_2=None, tokenizer_2=None, scheduler_config={},
                           dtype=torch.float32, placement=None)
    live = EasyAnimateModel(pipe).with_lora(weights, 0.6, "reward")
    get_patcher(pipe).sync(model, live.loras, "fused")  # the live model may be patched meanwhile
    patched_state = snapshot(model)

    dest = merged_model_destination(tmp_path, "merged")
    save_merged_model(pipe, live.loras, dest)
    assert_bitwise(model, patched_state)  # the live model is left alone
    assert not (tmp_path / "merged.partial").exists()
    assert os.path.samefile(folder / "vae" / "config.json", dest / "vae" / "config.json")  # hardlinked

    expected = tiny_transformer()  # the base the folder was saved from (same seed)
    merge_into_base(expected, live.loras)
    saved = load_file(str(dest / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(".attn2." in k for k in saved) == original_keys  # same format as the source
    if not original_keys:
        reloaded = EasyAnimateTransformer3DModel.from_pretrained(str(dest / "transformer"))
        assert_bitwise(reloaded, expected.state_dict())
    else:
        from easyanimate_reward.easyanimate.keymap import convert_original_state_dict
        converted = convert_original_state_dict(saved)
        assert set(converted) == set(expected.state_dict())
        for key, value in expected.state_dict().items():
            assert torch.equal(converted[key], value), key
    # merging bakes exactly what fused patching computes
    for path in weights.modules:
        assert torch.equal(expected.get_submodule(path).weight, patched_state[path + ".weight"])
    assert json.loads((dest / "merged_loras.json").read_text())["loras"][0]["strength"] == 0.6
    with pytest.raises(FileExistsError):
        save_merged_model(pipe, live.loras, dest)


def patched_at_half(official):
    """The official LoRA patched in (fused) at strength 0.5: model, weights, patcher, the weights' snapshot."""
    model, _, file = official
    weights = load_lora_file(file, model)
    patcher = LoraPatcher()
    apply(patcher, model, weights, 0.5)
    return model, weights, patcher, snapshot(model)


def test_merge_into_base_resets_the_patcher(official):
    model, weights, patcher, expected = patched_at_half(official)
    merge_into_base(model, (AppliedLora("a", weights, 0.5),), patcher=patcher)
    assert_bitwise(model, expected)
    apply(patcher, model, weights, 0.0)  # nothing patched now; the merged weights are the new base
    assert_bitwise(model, expected)


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "..", "", "a\\b", "x/../../y"])
def test_merged_name_sanitising_rejects(tmp_path, name):
    with pytest.raises(ValueError):
        merged_model_destination(tmp_path, name)


def test_merged_name_sanitising_accepts_plain_names(tmp_path):
    assert merged_model_destination(tmp_path, "My model v2") == Path(os.path.realpath(tmp_path)) / "My model v2"
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        merged_model_destination(tmp_path, "taken")


def test_under_sequential_offload_hooks_with_progress(official):
    from easyanimate_reward.easyanimate.memory import ModulePlacement

    model, _, file = official
    weights = load_lora_file(file, model)
    base_out = run(model)
    patcher = LoraPatcher()
    apply(patcher, model, weights, 0.7)
    fused_out = run(model)
    patcher.restore(model)
    before = snapshot(model)
    # Offload hooks replace param.data around every forward; patches must survive them.
    ModulePlacement("sequential_cpu_offload", "cpu").prepare({"transformer": model})
    calls = []
    patcher.sync(model, (AppliedLora("a", weights, 0.7),), "fused", progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (34, 34) and len(calls) == 34
    torch.testing.assert_close(run(model), fused_out, rtol=1e-5, atol=1e-5)
    patcher.sync(model, (AppliedLora("a", weights, 0.7),), "unfused")
    assert_bitwise(model, before)
    torch.testing.assert_close(run(model), fused_out, rtol=0, atol=2e-6)
    patcher.restore(model)
    assert torch.equal(run(model), base_out)


def test_a_stack_that_does_not_fit_changes_nothing(official):
    model, weights, patcher, patched = patched_at_half(official)
    wide = weights_from_tensors(random_lora(tiny_transformer(heads=3)), alpha=ALPHA)
    with pytest.raises(ValueError, match="made for another model"):
        patcher.sync(model, (AppliedLora("a", weights, 0.9), AppliedLora("wide", wide, 1.0)))
    assert_bitwise(model, patched)


def test_diffusers_style_save_is_read_back_as_the_same_update(official, tmp_path):
    """Our PEFT/diffusers writer folds alpha/rank into lora_B, so a reader that assumes alpha = rank
    (diffusers, PEFT without its config) and our own reader compute the same weights."""
    model, tensors, file = official
    weights = load_lora_file(file, model)
    patcher = LoraPatcher()
    apply(patcher, model, weights, 0.7)
    kohya_state = snapshot(model)
    patcher.restore(model)

    out = save_lora_file(tmp_path / "as_diffusers.safetensors", weights, dtype=torch.float32, style="diffusers")
    keys = set(load_file(str(out)))
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    reread = load_lora_file(out, model)
    apply(patcher, model, reread, 0.7)
    for name, value in snapshot(model).items():
        torch.testing.assert_close(value, kohya_state[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="style"):
        save_lora_file(tmp_path / "x.safetensors", weights, style="webui")


def test_diffusers_style_file_matches_peft_on_the_same_model(official, tmp_path):
    """Reference check: the file we write in the diffusers/PEFT layout, loaded by the peft library
    itself into the same transformer, computes what our patcher computes at strength 1."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    model, tensors, file = official
    weights = load_lora_file(file, model)
    out = save_lora_file(tmp_path / "for_peft.safetensors", weights, dtype=torch.float32, style="diffusers")
    state = {k.removeprefix("transformer."): v for k, v in load_file(str(out)).items()}

    reference = tiny_transformer()  # same seed: the same base weights
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=sorted(linears(reference)))
    inject_adapter_in_model(config, reference)
    result = set_peft_model_state_dict(reference, state)
    assert not result.unexpected_keys
    expected = run(reference)

    patcher = LoraPatcher()
    apply(patcher, model, weights, 1.0)
    torch.testing.assert_close(run(model), expected, rtol=0, atol=2e-6)
    patcher.restore(model)
    assert not torch.allclose(run(model), expected)
