"""The LoRA strength sweep from plain Python (easyanimate/sweep.py, no ComfyUI), the parsed-LoRA
cache it shares with the nodes (easyanimate/lora_cache.py), and its plot's x axis: points at their
strengths, uneven lists kept uneven."""

import math

import pytest
import torch

from easyanimate_reward.easyanimate.loading import load_pipe
from easyanimate_reward.easyanimate.lora_cache import LoraCache, cached_lora, LORA_CACHE
from easyanimate_reward.easyanimate.model import EasyAnimateModel
from easyanimate_reward.easyanimate.sampling import SampleRequest, sample_video
from easyanimate_reward.easyanimate.sweep import SweepResult, parse_strengths, strength_sweep
from easyanimate_reward.reward.plot import PALETTE, plot_series
from easyanimate_reward.tools.workflows import write_tiny_lora

REQUEST = SampleRequest(prompt="a cat", width=32, height=32, frames=5, steps=2, guidance_scale=1.0, seed=3)


@pytest.fixture(scope="module")
def model(tiny_models):
    return EasyAnimateModel(load_pipe(tiny_models["v5"], "fp32", "none"))


def test_a_sweep_runs_from_python_and_strength_0_is_the_base_model(model, tmp_path):
    lora = write_tiny_lora("v5", tmp_path / "sweep.safetensors", seed=2)
    seen = []
    result = strength_sweep(model, lora, "0, 0.3, 1", REQUEST, score=lambda video: float(video.mean()),
                            progress=lambda done, total: seen.append((done, total)))
    assert result.strengths == [0.0, 0.3, 1.0] and len(result.videos) == 3 and result.lora_name == "sweep.safetensors"
    assert torch.equal(result.videos[0], sample_video(model, REQUEST))  # the model as given
    assert not torch.equal(result.videos[1], result.videos[0]) and not torch.equal(result.videos[2], result.videos[1])
    assert result.means == [float(v.mean()) for v in result.videos]
    assert result.frames().shape[0] == 3 * REQUEST.frames
    assert seen[-1] == (6, 6) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    lines = result.text("brightness").splitlines()
    assert lines[1] == f"strength 0: {result.means[0]:.4f}" and lines[-1] == f"best: strength {result.best:g}"
    assert model.loras == ()  # the caller's model is untouched


def test_sweep_inputs_are_refused_before_the_lora_is_read(model, tmp_path):
    missing = tmp_path / "not-there.safetensors"
    with pytest.raises(ValueError, match="not a plain finite number"):
        strength_sweep(model, missing, "0, nan", REQUEST, score=float)
    with pytest.raises(ValueError, match="cfg"):
        strength_sweep(model, missing, "0, 1", SampleRequest(prompt="x", width=32, height=32, frames=5,
                                                             guidance_scale=math.nan), score=float)
    with pytest.raises(ValueError, match="multiples of 16"):
        strength_sweep(model, missing, [0, 1], SampleRequest(prompt="x", width=30, height=32, frames=5), score=float)
    assert parse_strengths("0 0.5,1") == [0.0, 0.5, 1.0]


def test_the_lora_cache_reads_a_file_once_and_again_when_it_changes(model, tmp_path):
    cache = LoraCache(size=2)
    path = write_tiny_lora("v5", tmp_path / "a.safetensors", seed=1)
    first = cache.get(path, model.pipe.transformer)
    assert cache.get(path, model.pipe.transformer) is first and cache.reads == 1
    write_tiny_lora("v5", path, seed=9)  # replaced under the same name
    second = cache.get(path, model.pipe.transformer)
    assert second is not first and cache.reads == 2
    others = [write_tiny_lora("v5", tmp_path / f"{n}.safetensors", seed=n) for n in (3, 4)]
    for other in others:
        cache.get(other, model.pipe.transformer)
    cache.get(path, model.pipe.transformer)  # evicted (two entries at most): read again
    assert cache.reads == 5
    assert cached_lora(path, model.pipe.transformer) is LORA_CACHE.get(path, model.pipe.transformer)


def _dot_columns(image, colour):
    pixels = (image[0] * 255).round().to(torch.uint8)
    mask = (pixels == torch.tensor(colour, dtype=torch.uint8)).all(dim=-1)
    mask[:60, 480:] = False  # the legend swatch (top right)
    columns = mask.any(dim=0).nonzero().flatten().tolist()
    groups, start = [], columns[0]
    for previous, column in zip(columns, columns[1:] + [None]):
        if column != previous + 1:
            groups.append((start + previous) / 2)
            start = column
    return groups


def test_plot_points_sit_at_their_x_positions():
    # NaN between the points: each is drawn alone, as a dot, at its own x.
    values = [3.0, math.nan, 2.0, math.nan, 1.0]  # the last dot low: clear of the legend (top right)
    uneven = _dot_columns(plot_series({"r": values}, x=[0, 0.1, 0.3, 0.6, 1]), PALETTE[0])
    even = _dot_columns(plot_series({"r": values}), PALETTE[0])
    assert len(uneven) == 3 and len(even) == 3
    assert (uneven[1] - uneven[0]) / (uneven[2] - uneven[0]) == pytest.approx(0.3, abs=0.01)
    assert (even[1] - even[0]) / (even[2] - even[0]) == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="finite positions"):
        plot_series({"r": [1.0, 2.0]}, x=[0, math.inf])


def test_the_sweep_plot_uses_the_strengths_as_x():
    result = SweepResult([0.0, 0.3, 1.0], [1.0, 2.0, 3.0], [], "l")
    expected = plot_series({"hps": [1.0, 2.0, 3.0]}, "hps vs LoRA strength (l)", "LoRA strength", "mean reward",
                           x=[0.0, 0.3, 1.0])
    assert torch.equal(result.plot("hps"), expected)
    assert not torch.equal(result.plot("hps"), plot_series({"hps": [1.0, 2.0, 3.0]}, "hps vs LoRA strength (l)",
                                                           "LoRA strength", "mean reward"))
