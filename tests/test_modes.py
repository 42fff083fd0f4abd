"""Generation modes on tiny models: text-to-video models, video-to-video with a denoise strength,
start/end images, Control and Control-Camera models, aspect buckets, guidance rescale."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from easyanimate_reward.easyanimate import conditioning
from easyanimate_reward.easyanimate.buckets import BUCKETS_512, closest_size, resolve_size
from easyanimate_reward.easyanimate.camera import CAMERA_SCALE, camera_motion
from easyanimate_reward.easyanimate.loading import load_pipe
from easyanimate_reward.easyanimate.lora_format import lora_target_modules, load_lora_file
from easyanimate_reward.easyanimate.model import EasyAnimateModel
from easyanimate_reward.easyanimate.sampling import SampleRequest, decode_latents, latent_shape, sample_video

SMALL = dict(width=32, height=32, frames=5, steps=3)


@pytest.fixture(scope="module")
def pipes(tiny_models, tiny_variants):
    folders = {**tiny_models, **tiny_variants}
    return {key: load_pipe(folder, "fp32", "none") for key, folder in folders.items()}


class TransformerSpy:
    """Records the extra inputs of every transformer call (and can refuse to be called)."""

    def __init__(self, pipe, forbid: bool = False):
        self.pipe, self.forbid, self.calls = pipe, forbid, []

    def __enter__(self):
        self.handle = self.pipe.transformer.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def _hook(self, module, args, kwargs):
        if self.forbid:
            raise AssertionError("the transformer ran although the request should have been refused")
        self.calls.append({k: kwargs.get(k) for k in ("inpaint_latents", "control_latents")} | {"x": args[0]})

    def __exit__(self, *exc):
        self.handle.remove()


# ------------------------------------------------------------------------------ model kinds


EXPECTED_KINDS = {
    "v5": ("InP", 33, False), "v5.1": ("InP", 33, False),
    "v5-t2v": ("text-to-video", 16, False), "v5.1-t2v": ("text-to-video", 16, False),
    "v5-control": ("Control", 32, False), "v5.1-control": ("Control", 48, True),
    "v5.1-camera": ("Control-Camera", 38, True),
}


def test_model_kind_comes_from_the_transformer_config(pipes, tiny_variants, tmp_path):
    for key, (kind, channels, reference) in EXPECTED_KINDS.items():
        inputs = conditioning.model_inputs(pipes[key])
        assert (inputs.kind, inputs.in_channels, inputs.reference) == (kind, channels, reference), key
    # A Control-Camera folder renamed like an InP model is still a Control-Camera model.
    renamed = tmp_path / "EasyAnimateV5.1-12b-zh-InP"
    shutil.copytree(tiny_variants["v5.1-camera"], renamed)
    assert conditioning.model_inputs(load_pipe(renamed, "fp32", "none")).kind == "Control-Camera"
    # The V5 Control folder is in the original layout, its config written by EasyAnimate's own class.
    config = json.loads((tiny_variants["v5-control"] / "transformer" / "config.json").read_text())
    assert config["in_channels"] == 32 and config["add_ref_latent_in_control_model"] is False
    with pytest.raises(ValueError, match="in_channels 20 matches no EasyAnimate model kind"):
        conditioning.model_inputs_from_config({"in_channels": 20, "out_channels": 16})


@pytest.mark.parametrize("key", ["v5-t2v", "v5.1-t2v"])
def test_text_to_video_models_sample_without_inpaint_latents(pipes, key):
    model = EasyAnimateModel(pipes[key])
    with TransformerSpy(pipes[key]) as spy:
        video = sample_video(model, SampleRequest("a cat", seed=2, **SMALL))
    assert video.shape == (5, 32, 32, 3) and torch.isfinite(video).all()
    assert len(spy.calls) == 3 * 1  # cfg batches uncond + cond into one call per step
    assert all(c["inpaint_latents"] is None and c["control_latents"] is None for c in spy.calls)
    assert spy.calls[0]["x"].shape[1] == 16
    assert torch.equal(video, sample_video(model, SampleRequest("a cat", seed=2, **SMALL)))


@pytest.mark.parametrize("key, field, match", [
    ("v5-t2v", "start_image", "image-to-video needs an InP model"),
    ("v5.1-t2v", "end_image", "need an InP model"),
    ("v5-t2v", "control_video", "needs a Control model"),
    ("v5", "control_video", "needs a Control model"),
    ("v5", "camera", "needs a V5.1 Control-Camera model"),
    ("v5-control", "start_image", "InP model"),
    ("v5-control", "ref_image", "reference image needs a V5.1 Control"),
    ("v5.1-camera", "control_video", "needs a Control model"),
])
def test_inputs_a_model_cannot_take_are_refused_before_any_work(pipes, key, field, match):
    values = {"start_image": torch.rand(3, 32, 32), "end_image": torch.rand(3, 32, 32),
              "control_video": torch.rand(5, 3, 32, 32), "ref_image": torch.rand(3, 32, 32),
              "camera": camera_motion(["pan up"], 1.0, 5)}
    request = SampleRequest("a cat", **SMALL, **{field: values[field]})
    if key == "v5.1-camera" and field != "camera":
        request.camera = values["camera"]
    with TransformerSpy(pipes[key], forbid=True), pytest.raises(ValueError, match=match) as err:
        sample_video(EasyAnimateModel(pipes[key]), request)
    assert f"in_channels {EXPECTED_KINDS[key][1]}" in str(err.value)


def test_bad_mode_inputs_are_refused_with_the_numbers(pipes):
    camera_pipe = EasyAnimateModel(pipes["v5.1-camera"])
    with TransformerSpy(pipes["v5.1-camera"], forbid=True):
        with pytest.raises(ValueError, match="needs a camera input"):
            sample_video(camera_pipe, SampleRequest("a", **SMALL))
        with pytest.raises(ValueError, match="camera motion has 3 frames but the video has 5"):
            sample_video(camera_pipe, SampleRequest("a", camera=camera_motion(["pan up"], 1, 3), **SMALL))
    with TransformerSpy(pipes["v5.1-control"], forbid=True):
        with pytest.raises(ValueError, match="control_video has 4 frames but the video has 5"):
            sample_video(EasyAnimateModel(pipes["v5.1-control"]),
                         SampleRequest("a", control_video=torch.rand(4, 3, 32, 32), **SMALL))
    with TransformerSpy(pipes["v5"], forbid=True):
        with pytest.raises(ValueError, match=r"denoise_strength must be in \(0, 1\]"):
            sample_video(EasyAnimateModel(pipes["v5"]),
                         SampleRequest("a", video=torch.rand(5, 3, 32, 32), denoise_strength=0.0, **SMALL))
        with pytest.raises(ValueError, match="leaves no denoising step"):
            sample_video(EasyAnimateModel(pipes["v5"]),
                         SampleRequest("a", video=torch.rand(5, 3, 32, 32), denoise_strength=0.2, **SMALL))


# ------------------------------------------------------------------------------ video-to-video


def _reconstruction(pipe, video):
    frames = video.shape[0]
    request = SampleRequest("a", video=video, denoise_strength=0.5, width=32, height=32, frames=frames)
    source = conditioning.source_latents(pipe, request, latent_shape(1, 32, 32, frames))
    return decode_latents(pipe, source)[0].permute(1, 2, 3, 0)


@pytest.mark.parametrize("key, scheduler", [("v5", "DDIM"), ("v5", "Euler"), ("v5", "DPM++"), ("v5.1", "auto"),
                                            ("v5-t2v", "DDIM")])
def test_video_to_video_strength(pipes, key, scheduler):
    pipe = pipes[key]
    model = EasyAnimateModel(pipe)
    video = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # one frame: cheap, same code
    base = dict(width=32, height=32, frames=1, steps=10, seed=3, scheduler=scheduler)
    # Strength 1 is text-to-video: the same video, bit for bit.
    t2v = sample_video(model, SampleRequest("a cat", **base))
    assert torch.equal(sample_video(model, SampleRequest("a cat", video=video, denoise_strength=1.0, **base)), t2v)
    # Strength 0.5 runs int(10 * 0.5) = 5 steps from the noised input.
    with TransformerSpy(pipe) as spy:
        half = sample_video(model, SampleRequest("a cat", video=video, denoise_strength=0.5, **base))
    assert len(spy.calls) == 5
    assert not torch.allclose(half, t2v, atol=1e-3)
    # A low strength stays close to the input (its VAE reconstruction: the tiny VAE is random).
    recon = _reconstruction(pipe, video)
    low = (sample_video(model, SampleRequest("a cat", video=video, denoise_strength=0.1, **base)) - recon).abs().mean()
    far = (t2v - recon).abs().mean()
    if scheduler == "DPM++":  # its own "leading" spacing ends at t=91, so 1 step starts from more noise
        assert low < 0.9 * far
    else:
        assert low < far / 5, (low, far)


# ------------------------------------------------------------------------------ start and end images


@pytest.mark.parametrize("key", ["v5", "v5.1"])
def test_start_and_end_images_are_kept_frames_of_the_inpaint_input(pipes, key):
    pipe = pipes[key]
    shape = latent_shape(1, 32, 32, 9)
    start, end = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    both = conditioning.inpaint_latents(pipe, shape, 9, start, [0], end)
    assert both.shape == (1, 17, 3, 4, 4)
    # The masked video: start at frame 0, end at frame 8, -1 elsewhere (plus the model's noise augmentation).
    video = torch.full((1, 3, 9, 32, 32), -1.0)
    video[:, :, 0], video[:, :, -1] = start * 2 - 1, end * 2 - 1
    if pipe.transformer.config.add_noise_in_inpaint_model:
        noise = torch.randn(video.shape[1:], generator=torch.Generator().manual_seed(1))[None]
        video = torch.where(video == -1, video, video + conditioning.INPAINT_NOISE_RATIO * noise)
    assert torch.allclose(both[:, 1:], conditioning.vae_encode(pipe, video), atol=1e-5)
    scale = pipe.vae.config.scaling_factor
    assert torch.allclose(both[:, 0, 0], torch.full((4, 4), scale))  # the start frame's latent is kept
    end_only = conditioning.inpaint_latents(pipe, shape, 9, None, [0], end)
    assert torch.equal(end_only[:, 0, 0], torch.zeros(1, 4, 4))  # frame 0 is generated
    start_only = conditioning.inpaint_latents(pipe, shape, 9, start, [0])
    assert not torch.allclose(start_only[:, 1:, -1], both[:, 1:, -1])  # the last latent sees the end image
    model = EasyAnimateModel(pipe)
    base = dict(width=32, height=32, frames=9, steps=1, seed=1)
    videos = [sample_video(model, SampleRequest("a", **base, **kw)) for kw in
              ({"start_image": start[0]}, {"start_image": start[0], "end_image": end[0]}, {"end_image": end[0]})]
    assert not torch.allclose(videos[0], videos[1]) and not torch.allclose(videos[1], videos[2])


# ------------------------------------------------------------------------------ Control


@pytest.mark.parametrize("key", ["v5-control", "v5.1-control"])
def test_control_video_and_reference_reach_the_transformer(pipes, key):
    pipe = pipes[key]
    model = EasyAnimateModel(pipe)
    reference = conditioning.model_inputs(pipe).reference
    control = torch.rand(7, 3, 40, 48)  # more frames and another size: the first 5, resized
    ref = torch.rand(3, 32, 32)
    with TransformerSpy(pipe) as spy:
        video = sample_video(model, SampleRequest("a", control_video=control, ref_image=ref if reference else None,
                                                  guidance_scale=1.0, **SMALL))
    latents = spy.calls[0]["control_latents"]
    assert spy.calls[0]["inpaint_latents"] is None
    assert latents.shape == (1, 32 if reference else 16, 2, 4, 4)
    expected = conditioning.vae_encode(pipe, conditioning._frames_to_video(control, 5, 32, 32, "cpu"))
    assert torch.allclose(latents[:, :16], expected)
    if reference:
        ref_latents = conditioning.vae_encode(pipe, conditioning._frames_to_video(ref[None], 1, 32, 32, "cpu"))
        assert torch.allclose(latents[:, 16:, :1], ref_latents) and torch.equal(latents[:, 16:, 1:],
                                                                                 torch.zeros(1, 16, 1, 4, 4))
    other = sample_video(model, SampleRequest("a", control_video=control.flip(0), guidance_scale=1.0, **SMALL))
    assert video.shape == (5, 32, 32, 3) and not torch.allclose(video, other)


# ------------------------------------------------------------------------------ Control-Camera


def test_camera_presets_follow_the_official_formulas():
    path = camera_motion(["pan left"], speed=2.0, frames=4)
    # frame i of n: translation (i/n) * speed * 1.5 * T, no rotation
    expected = torch.tensor([[1.0, 0, 0]], dtype=torch.float64) * torch.arange(4)[:, None] / 4 * 2 * 1.5
    assert torch.allclose(path.poses[:, :, 3], expected, atol=1e-12, rtol=0)
    assert torch.allclose(path.poses[:, :, :3], torch.eye(3).expand(4, 3, 3).double())
    diagonal = camera_motion(["pan up", "pan left"], 1.0, 4)
    assert torch.allclose(diagonal.poses[-1, :, 3], torch.tensor([1.0, 1.0, 0.0]).double() * 0.75 * 1.5)
    turn = camera_motion(["rotate clockwise"], 1.0, 2).poses[1, :, :3]  # angle -(1/2) * pi/3 about z
    c, s = math.cos(-math.pi / 6), math.sin(-math.pi / 6)
    assert torch.allclose(turn, torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64))
    joined = camera_motion(["pan up"], 1.0, 3).then(camera_motion(["zoom in"], 1.0, 3))
    assert joined.frames == 6 and torch.allclose(joined.poses[3], camera_motion(["pan up"], 1.0, 3).poses[-1])
    rays = camera_motion(["zoom in"], 1.0, 3).plucker(48, 32)
    assert rays.shape == (6, 3, 32, 48)
    assert torch.equal(rays[:3, 0], torch.zeros(3, 32, 48))  # first camera at the origin: no moment
    assert torch.allclose(rays[3:, 0].norm(dim=0), torch.ones(32, 48))  # unit directions
    # Pixel (0, 0) of a 48x32 frame: 48/32 < 1280/720, so fx is rescaled to a 1280x720-shaped frame
    # of the same height (official), then both are scaled to pixels.
    fx, fy = 32 * (1280 / 720) * 0.474812461, 0.844111024 * 32
    direction = torch.tensor([(0.5 - 24) / fx, (0.5 - 16) / fy, 1.0])
    assert torch.allclose(rays[3:, 0, 0, 0], direction / direction.norm(), atol=1e-6)
    # Later frames: the zoomed-in camera sits at t = -R^T (0, 0, -2 * 1.5 / 3): moment = o x d
    origin = torch.tensor([0.0, 0.0, 1.0])
    assert torch.allclose(rays[:3, 1, 0, 0], torch.linalg.cross(origin, rays[3:, 1, 0, 0], dim=0), atol=1e-6)
    with pytest.raises(ValueError, match="unknown camera motion 'spin'"):
        camera_motion(["spin"])


def test_camera_conditioning_reaches_the_transformer(pipes):
    pipe = pipes["v5.1-camera"]
    model = EasyAnimateModel(pipe)
    camera = camera_motion(["pan up", "zoom out"], 1.0, 7)
    ref = torch.rand(3, 32, 32)
    with TransformerSpy(pipe) as spy:
        video = sample_video(model, SampleRequest("a", camera=camera, ref_image=ref, guidance_scale=1.0, **SMALL))
    latents = spy.calls[0]["control_latents"]
    assert latents.shape == (1, 6 + 16, 2, 4, 4)
    rays = camera.plucker(32, 32, 5)[None]
    expected = conditioning.resize_like_latents(rays, (1, 16, 2, 4, 4)) * CAMERA_SCALE
    assert torch.allclose(latents[:, :6], expected)
    assert torch.allclose(latents[:, 6:, :1],
                          conditioning.vae_encode(pipe, conditioning._frames_to_video(ref[None], 1, 32, 32, "cpu")))
    still = sample_video(model, SampleRequest("a", camera=camera_motion(["static"], 1.0, 5), ref_image=ref,
                                              guidance_scale=1.0, **SMALL))
    assert video.shape == (5, 32, 32, 3) and not torch.allclose(video, still)


# ------------------------------------------------------------------------------ buckets, guidance rescale


def test_aspect_buckets_pick_the_official_sizes():
    assert closest_size(720, 1280, 512) == (384, 672)  # 0.5625 -> key 0.57
    assert closest_size(720, 1280, 768) == (576, 1008)
    assert closest_size(720, 1280, 960) == (720, 1248)  # 1260 floored to a multiple of 16
    assert closest_size(1000, 1000, 1024) == (1024, 1024)
    assert closest_size(1920, 1080, 512) == (672, 384)
    assert len(BUCKETS_512) == 40 and BUCKETS_512[1.0] == (512, 512)
    with pytest.raises(ValueError, match="base_resolution must be one of 512, 768, 960, 1024"):
        closest_size(1, 1, 640)
    # The reference image decides over the other inputs; without inputs, width x height does.
    request = SampleRequest("a", width=64, height=32, base_resolution=512, video=torch.rand(5, 3, 90, 160),
                            ref_image=torch.rand(3, 160, 90))
    assert (resolve_size(request).height, resolve_size(request).width) == (672, 384)
    assert (resolve_size(SampleRequest("a", width=64, height=32, base_resolution=512)).width,
            resolve_size(SampleRequest("a", width=64, height=32, base_resolution=512)).height) == (704, 352)
    assert resolve_size(SampleRequest("a", width=48, height=32)).width == 48  # fixed size stays


def test_guidance_rescale_matches_diffusers_and_changes_the_video(pipes):
    from diffusers.pipelines.easyanimate.pipeline_easyanimate_control import rescale_noise_cfg

    guided, cond = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 16, 3, 4, 4)
    assert torch.allclose(conditioning.rescale_guidance(guided, cond, 0.7), rescale_noise_cfg(guided, cond, 0.7))
    assert conditioning.rescale_guidance(guided, cond, 0.0) is guided
    model = EasyAnimateModel(pipes["v5.1"])
    plain = sample_video(model, SampleRequest("a cat", seed=4, **SMALL))
    rescaled = sample_video(model, SampleRequest("a cat", seed=4, guidance_rescale=0.7, **SMALL))
    assert not torch.allclose(plain, rescaled, atol=1e-4)


# ------------------------------------------------------------------------------ LoRAs and training on every kind


def test_reward_lora_keys_resolve_on_every_kind(pipes, tmp_path):
    from easyanimate_reward.tools.workflows import write_tiny_lora

    # LoRAs made for the InP models: only the patch embedding (a Conv2d, no LoRA) differs between
    # kinds of the same size, so every key resolves on T2V, Control and Control-Camera models.
    paths = {v: write_tiny_lora(v, tmp_path / f"{v}.safetensors") for v in ("v5", "v5.1")}
    for key in ("v5-t2v", "v5.1-t2v", "v5-control", "v5.1-control", "v5.1-camera"):
        transformer = pipes[key].transformer
        weights = load_lora_file(paths["v5.1" if key.startswith("v5.1") else "v5"], transformer)
        assert set(weights.modules) == set(lora_target_modules(transformer)), key
    pipe = pipes["v5.1-camera"]
    model = EasyAnimateModel(pipe)
    weights = load_lora_file(paths["v5.1"], pipe.transformer)
    request = SampleRequest("a", seed=1, camera=camera_motion(["pan up"], 1, 5), **SMALL)
    base = sample_video(model, request)
    assert not torch.allclose(sample_video(model.with_lora(weights, 1.0, "lora"), request), base, atol=1e-4)
    assert torch.equal(sample_video(model, request), base)


@pytest.mark.parametrize("key", ["v5-t2v", "v5.1-control", "v5.1-camera"])
def test_training_rollouts_run_on_every_kind(pipes, key):
    from easyanimate_reward.training.rollout import RolloutSettings, rollout_video
    from easyanimate_reward.easyanimate.sampling import encode_request_prompts

    pipe = pipes[key]
    cond, _ = encode_request_prompts(pipe, "a cat", "", 1.0)
    settings = RolloutSettings(width=32, height=32, frames=5, sampling_steps=2, num_decoded_latents=1)
    leaf = torch.zeros((), requires_grad=True)
    handle = pipe.transformer.proj_out.register_forward_hook(lambda m, i, o: o + leaf)
    try:
        video = rollout_video(pipe, settings, cond, None, [0], grad_steps={1})
    finally:
        handle.remove()
    video.mean().backward()
    assert video.shape == (1, 3, 1, 32, 32) and leaf.grad is not None and leaf.grad != 0
