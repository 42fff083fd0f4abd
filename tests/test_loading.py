"""Model folders: layout detection, strict loading, clear errors, memory modes, sampling."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from easyanimate_reward.easyanimate.loading import ModelFolderError, detect_layout, load_pipe
from easyanimate_reward.easyanimate.memory import FLOAT8
from easyanimate_reward.easyanimate.model import EasyAnimateModel
from easyanimate_reward.easyanimate.sampling import (
    SampleRequest, inpaint_condition, latent_shape, make_scheduler, sample_video)
from easyanimate_reward.easyanimate.tiny import build_tiny_transformer

SMALL = dict(width=32, height=32, frames=5, steps=3)


@pytest.fixture(scope="module")
def pipes(tiny_models):
    return {v: load_pipe(f, "fp32", "none") for v, f in tiny_models.items()}


def test_layouts_detected_from_config_files_not_names(tiny_models, tmp_path):
    assert detect_layout(tiny_models["v5"]).version == "v5"
    assert detect_layout(tiny_models["v5.1"]).version == "v5.1"
    # A V5.1 folder renamed to look like V5 (and vice versa) keeps its own scheduler family.
    renamed = tmp_path / "EasyAnimateV5-12b-zh-InP"
    shutil.copytree(tiny_models["v5.1"], renamed)
    layout = detect_layout(renamed)
    assert layout.version == "v5.1" and layout.scheduler_class == "FlowMatchEulerDiscreteScheduler"
    renamed5 = tmp_path / "EasyAnimateV5.1-12b-zh-InP"
    shutil.copytree(tiny_models["v5"], renamed5)
    assert detect_layout(renamed5).scheduler_class == "DDIMScheduler"


def test_original_format_v5_transformer_loads_to_the_same_weights(tiny_models, pipes):
    keys = load_file(str(tiny_models["v5"] / "transformer" / "diffusion_pytorch_model.safetensors")).keys()
    assert any(".attn2.to_q." in k for k in keys), "tiny V5 must be written with original key names"
    reference = build_tiny_transformer("v5").state_dict()
    loaded = pipes["v5"].transformer.state_dict()
    assert set(loaded) == set(reference)
    for k, v in reference.items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize("version", ["v5", "v5.1"])
def test_both_layouts_sample_deterministically(pipes, version):
    model = EasyAnimateModel(pipes[version])
    a = sample_video(model, SampleRequest("a cat", seed=7, **SMALL))
    b = sample_video(model, SampleRequest("a cat", seed=7, **SMALL))
    c = sample_video(model, SampleRequest("a cat", seed=8, **SMALL))
    assert a.shape == (5, 32, 32, 3) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # A seed gives the same video whether it is sampled alone or as the second of a batch.
    batch = sample_video(model, SampleRequest("a cat", seed=7, videos=2, **SMALL))
    assert torch.equal(batch[:5], a) and torch.equal(batch[5:], c)


def test_image_to_video_condition_keeps_the_first_frame(pipes):
    pipe = pipes["v5"]
    shape = latent_shape(1, 32, 32, 5)
    t2v = inpaint_condition(pipe, shape, 5, None, [0])
    assert t2v.shape == (1, 17, 2, 4, 4) and not t2v.any()
    i2v = inpaint_condition(pipe, shape, 5, torch.rand(1, 3, 48, 40), [0])
    mask = i2v[:, 0]
    scale = pipe.vae.config.scaling_factor
    assert torch.allclose(mask[:, 0], torch.full_like(mask[:, 0], scale))  # frame 0 kept
    assert not mask[:, 1:].any()  # the rest is to be generated
    assert i2v[:, 1:].abs().sum() > 0
    model = EasyAnimateModel(pipe)
    t2v_video = sample_video(model, SampleRequest("a cat", seed=1, **SMALL))
    i2v_video = sample_video(model, SampleRequest("a cat", seed=1, start_image=torch.rand(3, 32, 32), **SMALL))
    assert not torch.allclose(t2v_video, i2v_video)


def test_scheduler_choice_must_fit_the_model(pipes, monkeypatch):
    import diffusers

    with pytest.raises(ValueError, match="flow-matching"):
        make_scheduler(pipes["v5.1"], "DDIM")
    with pytest.raises(ValueError, match="noise-prediction"):
        make_scheduler(pipes["v5"], "Flow")
    # The chosen scheduler is the one whose step() runs, and each gives its own video.
    expected = {"DDIM": "DDIMScheduler", "Euler": "EulerDiscreteScheduler", "Euler A": "EulerAncestralDiscreteScheduler",
                "DPM++": "DPMSolverMultistepScheduler", "PNDM": "PNDMScheduler", "auto": "DDIMScheduler"}
    ran = []
    for cls_name in set(expected.values()):
        cls = getattr(diffusers, cls_name)

        def step(self, *args, _original=cls.step, _name=cls_name, **kwargs):
            ran.append(type(self).__name__)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "step", step)
    model = EasyAnimateModel(pipes["v5"])
    videos = {}
    for name, cls_name in expected.items():
        ran.clear()
        videos[name] = sample_video(model, SampleRequest("a dog", scheduler=name, width=32, height=32, frames=5, steps=6))
        assert torch.isfinite(videos[name]).all(), name
        assert ran and set(ran) == {cls_name}, (name, set(ran))
    names = [n for n in expected if n != "auto"]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (videos[a] - videos[b]).abs().max() > 1e-4, f"{a} and {b} gave the same video"
    assert torch.equal(videos["auto"], videos["DDIM"])  # the tiny V5 folder's own scheduler is DDIM


class RecordMoves(torch.overrides.TorchFunctionMode):
    """Every Tensor.to(device) of a weight of `modules` while active: {parameter name: [target
    devices]}. On a CPU-only machine nothing really moves, so the memory modes are checked by the
    moves they ask for (compute device "cpu:0" vs offload device "cpu" keeps them apart; a move
    to "cpu:0" copies, so weights are matched by their data pointer at the time of each call)."""

    def __init__(self, modules: dict):
        super().__init__()
        self.modules = modules
        self.moves: dict[str, list[str]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and isinstance(args[0], torch.Tensor):
            target = kwargs.get("device")
            for a in args[1:]:
                if isinstance(a, (torch.device, str)):
                    target = a
            if target is not None:
                ptr = args[0].data_ptr()
                for prefix, module in self.modules.items():
                    for name, p in module.named_parameters():
                        if p.data_ptr() == ptr:
                            self.moves.setdefault(f"{prefix}.{name}", []).append(str(torch.device(target)))
        return func(*args, **kwargs)


def test_memory_modes_compute_the_same_video(tiny_models, pipes):
    request = SampleRequest("a cat", seed=3, **SMALL)
    reference = sample_video(EasyAnimateModel(pipes["v5.1"]), request)
    for mode in ("model_cpu_offload", "sequential_cpu_offload"):
        pipe = load_pipe(tiny_models["v5.1"], "fp32", mode, device="cpu:0", offload_device="cpu")
        names = ("transformer", "vae", "text_encoder")
        recorder = RecordMoves({name: getattr(pipe, name) for name in names})
        with recorder:
            video = sample_video(EasyAnimateModel(pipe), request)
        assert torch.allclose(video, reference, atol=1e-6, rtol=0), (mode, (video - reference).abs().max())
        # The mode really moved the weights: each module's weights went to the compute device while
        # it ran (and, for whole-module offload, back to the offload device after).
        for name in names:
            # Sequential offload moves only what runs: no VAE encoder (text-to-video), no vision tower.
            ran = {"vae": lambda n: n.startswith("decoder."), "text_encoder": lambda n: "visual" not in n}
            keep = ran.get(name, lambda n: True) if mode == "sequential_cpu_offload" else (lambda n: True)
            moved = [recorder.moves.get(f"{name}.{n}", []) for n, p in getattr(pipe, name).named_parameters() if keep(n)]
            assert moved
            assert all("cpu:0" in m for m in moved), f"{mode}: {name} weights were not moved to the compute device"
            if mode == "model_cpu_offload":
                assert all(m.index("cpu:0") < len(m) - 1 - m[::-1].index("cpu") for m in moved), \
                    f"{mode}: {name} was not moved back to the offload device after use"
    fp8 = load_pipe(tiny_models["v5.1"], "fp32", "model_cpu_offload_and_qfloat8")
    linears = {p: m for p, m in fp8.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = {p for p in linears if "norm" in p or p == "proj_out"}  # the model's skip list (tests/test_memory.py)
    assert kept and all((m.weight.dtype == FLOAT8) == (p not in kept) for p, m in linears.items())
    video = sample_video(EasyAnimateModel(fp8), request)
    assert torch.isfinite(video).all()
    # fp8 weights change the numbers a little, not the picture (0.9994 measured on the tiny model).
    corr = float(torch.corrcoef(torch.stack([video.flatten(), reference.flatten()]))[0, 1])
    assert corr > 0.999, corr


def test_missing_and_corrupt_files_name_the_file(tiny_models, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_models["v5"], folder)
    (folder / "text_encoder_2" / "config.json").unlink()
    with pytest.raises(ModelFolderError, match=r"text_encoder_2.config\.json"):
        load_pipe(folder, "fp32", "none")

    shutil.rmtree(folder)
    shutil.copytree(tiny_models["v5"], folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    with pytest.raises(ModelFolderError, match="corrupt or incomplete"):
        load_pipe(folder, "fp32", "none")

    with pytest.raises(ModelFolderError, match="does not exist"):
        load_pipe(tmp_path / "nope", "fp32", "none")


def test_mixed_parts_are_refused(tiny_models, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_models["v5"], folder)
    shutil.rmtree(folder / "transformer")
    shutil.copytree(tiny_models["v5.1"] / "transformer", folder / "transformer")  # no T5 projection
    with pytest.raises(ModelFolderError):
        load_pipe(folder, "fp32", "none")
