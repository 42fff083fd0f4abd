"""Mixing LoRAs into one file: exact by concatenated ranks, optional SVD reduction, official format."""

import math

import pytest
import torch
from safetensors.torch import load_file

from easyanimate_reward.easyanimate.lora_format import load_lora_file, save_lora_file
from easyanimate_reward.easyanimate.lora_mix import delta, mix_loras, rounding_error
from easyanimate_reward.easyanimate.lora_patch import LoraPatcher
from easyanimate_reward.easyanimate.model import AppliedLora
from test_lora import linears, official_name, random_lora, run, snapshot, tiny_transformer, write_official


@pytest.fixture()
def two_loras(tmp_path):
    model = tiny_transformer()
    first = write_official(tmp_path / "hps.safetensors", random_lora(model, seed=1, rank=4), alpha=2.0)
    second = write_official(tmp_path / "mps.safetensors", random_lora(model, seed=2, rank=8), alpha=8.0)
    return model, load_lora_file(first, model), load_lora_file(second, model)


def official_kohya_merge(model, path, multiplier):
    """What EasyAnimate's merge_lora does with a kohya file: per layer
    W += multiplier * (alpha / up.shape[1]) * up @ down (module found by its flattened name)."""
    by_name = {official_name(p): m for p, m in linears(model).items()}
    state = load_file(str(path))
    layers = {key.split(".", 1)[0] for key in state}
    with torch.no_grad():
        for layer in layers:
            up = state[f"{layer}.lora_up.weight"].float()
            down = state[f"{layer}.lora_down.weight"].float()
            alpha = state[f"{layer}.alpha"].item() / up.shape[1]
            module = by_name[layer]
            module.weight += multiplier * alpha * (up @ down).to(module.weight.dtype)
    return len(layers)


def test_exact_mix_equals_applying_both_loras_at_their_weights(two_loras, tmp_path):
    model, hps, mps = two_loras
    base = snapshot(model)
    mixed, report = mix_loras([(hps, 0.5), (mps, 0.7)])
    assert report.relative_error == 0.0 and set(report.ranks.values()) == {12}
    # Per module, exactly the weighted sum of the two updates.
    for path, module in mixed.modules.items():
        expected = 0.5 * delta(hps.modules[path]) + 0.7 * delta(mps.modules[path])
        torch.testing.assert_close(delta(module), expected, rtol=1e-6, atol=1e-7)
    # Patched into the model: the mix at strength 1 == both LoRAs at 0.5 and 0.7.
    patcher = LoraPatcher()
    patcher.sync(model, (AppliedLora("hps", hps, 0.5), AppliedLora("mps", mps, 0.7)), "fused")
    both = {path: m.weight.detach().clone() for path, m in linears(model).items()}
    out_both = run(model)
    patcher.sync(model, (AppliedLora("mix", mixed, 1.0),), "fused")
    for path, m in linears(model).items():
        torch.testing.assert_close(m.weight, both[path], rtol=0, atol=2e-7)  # measured 6e-8
    torch.testing.assert_close(run(model), out_both, rtol=0, atol=5e-6)  # measured 2.1e-6
    patcher.sync(model, (), "fused")

    # Written in the official format (fp32): EasyAnimate's merge_lora reads it and gets the same weights.
    file = save_lora_file(tmp_path / "mix.safetensors", mixed, dtype=torch.float32)
    assert official_kohya_merge(model, file, 1.0) == len(linears(model))
    for path, m in linears(model).items():
        torch.testing.assert_close(m.weight, both[path], rtol=0, atol=2e-7)
    model.load_state_dict(base)
    # And the pack's own loader reads it back unchanged.
    again = load_lora_file(file, model)
    for path, module in mixed.modules.items():
        assert torch.equal(again.modules[path].down, module.down) and torch.equal(again.modules[path].up, module.up)


def test_bf16_mix_file_within_the_stated_tolerance(two_loras, tmp_path):
    model, hps, mps = two_loras
    mixed, _ = mix_loras([(hps, 0.5), (mps, 0.7)])
    error = rounding_error(mixed, torch.bfloat16)
    assert error < 2.5e-3  # measured 1.6e-3 (0 when every weight x alpha / rank is a power of 2)
    file = save_lora_file(tmp_path / "mix_bf16.safetensors", mixed, dtype=torch.bfloat16)
    loaded = load_lora_file(file, model)
    num = sum(float((delta(loaded.modules[p]) - delta(m)).pow(2).sum()) for p, m in mixed.modules.items())
    den = sum(float(delta(m).pow(2).sum()) for m in mixed.modules.values())
    assert math.sqrt(num / den) == pytest.approx(error, rel=1e-6)


def test_reduced_mix_reports_the_svd_error(two_loras):
    _, hps, mps = two_loras
    exact, _ = mix_loras([(hps, 0.5), (mps, 0.5)])
    full, report_full = mix_loras([(hps, 0.5), (mps, 0.5)], rank=12)
    assert report_full.relative_error < 1e-6  # rank 12 holds the whole update
    reduced, report = mix_loras([(hps, 0.5), (mps, 0.5)], rank=4)
    assert set(report.ranks.values()) == {4}
    num = den = 0.0
    for path, module in reduced.modules.items():
        reference = delta(exact.modules[path])
        num += float((delta(module) - reference).pow(2).sum())
        den += float(reference.pow(2).sum())
        # The truncation is the best rank-4 approximation (Eckart-Young): the SVD's own tail.
        s = torch.linalg.svdvals(reference)
        assert float((delta(module) - reference).norm()) == pytest.approx(float(s[4:].norm()), rel=1e-5, abs=1e-9)
    assert report.relative_error == pytest.approx(math.sqrt(num / den), rel=1e-6)
    assert 0 < report.relative_error < 1
    assert "relative error" in report.describe()


def test_mix_refuses_bad_input(two_loras):
    _, hps, mps = two_loras
    with pytest.raises(ValueError, match="at least one LoRA"):
        mix_loras([])
    with pytest.raises(ValueError, match="finite"):
        mix_loras([(hps, float("nan"))])
    with pytest.raises(ValueError, match="target rank"):
        mix_loras([(hps, 1.0)], rank=0)
    with pytest.raises(ValueError, match="every weight is 0"):
        mix_loras([(hps, 0.0), (mps, 0.0)])
