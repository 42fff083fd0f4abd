"""Samplers (flow multistep with shift, step-count refusal), TeaCache, cfg-skip, latent previews and
seeds per video: each test asserts that the option changed the computation itself (transformer
calls, the scheduler class that ran), not only that the output is finite."""

from collections import Counter

import diffusers
import pytest
import torch

from easyanimate_reward.easyanimate import preview, sampling
from easyanimate_reward.easyanimate.loading import load_pipe
from easyanimate_reward.easyanimate.model import EasyAnimateModel
from easyanimate_reward.easyanimate.sampling import SampleRequest, make_scheduler, sample_video, set_timesteps
from easyanimate_reward.easyanimate.schedulers import FLOW_SCHEDULERS, NOISE_SCHEDULERS, check_steps
from easyanimate_reward.easyanimate.step_cache import LoopSpeedups, SpeedSettings, teacache_coefficients

SMALL = dict(width=32, height=32, frames=5)


@pytest.fixture(scope="module")
def pipes(tiny_models):
    return {v: load_pipe(f, "fp32", "none") for v, f in tiny_models.items()}


@pytest.fixture
def block_calls(pipes):
    """Batch rows through the first transformer block, per call, for each pipe (a full block-stack pass)."""
    calls = {v: [] for v in pipes}
    handles = [p.transformer.transformer_blocks[0].register_forward_hook(
        lambda m, args, out, v=v: calls[v].append(args[0].shape[0])) for v, p in pipes.items()]
    yield calls
    for h in handles:
        h.remove()


def spy_scheduler_steps(monkeypatch) -> Counter:
    """Count scheduler.step calls per scheduler class (the class that really ran)."""
    ran = Counter()
    for cls in {getattr(diffusers, n) for n in [*NOISE_SCHEDULERS.values(), *FLOW_SCHEDULERS.values()]}:
        original = cls.step

        def step(self, *args, _original=original, **kwargs):
            ran[type(self).__name__] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "step", step)
    return ran


# ------------------------------------------------------------------------------ schedulers

def test_flow_multistep_schedulers_are_diffusers_solvers_in_flow_mode(pipes):
    flow = pipes["v5.1"]
    folder_shift = flow.scheduler_config["shift"]
    for name, cls in (("Flow UniPC", diffusers.UniPCMultistepScheduler),
                      ("Flow DPM++", diffusers.DPMSolverMultistepScheduler)):
        s = make_scheduler(flow, name)
        assert type(s) is cls
        assert s.config.use_flow_sigmas and s.config.prediction_type == "flow_prediction"
        assert s.config.flow_shift == folder_shift  # 0 = the folder's own schedule
        assert make_scheduler(flow, name, shift=5.0).config.flow_shift == 5.0
    euler = make_scheduler(flow, "Flow", shift=5.0)
    assert type(euler) is diffusers.FlowMatchEulerDiscreteScheduler and euler.config.shift == 5.0
    # a larger shift keeps more of the steps at high noise
    low, high = (set_timesteps(make_scheduler(flow, "Flow UniPC", shift=s), 10, "cpu") for s in (1.0, 6.0))
    assert (high[1:] >= low[1:]).all() and (high[1:] > low[1:]).any()
    with pytest.raises(ValueError, match=r"flow-matching \(V5.1\) models only"):
        make_scheduler(pipes["v5"], "DDIM", shift=3.0)
    for bad in (float("nan"), -1.0, 1e9):
        with pytest.raises(ValueError, match="shift must be"):
            make_scheduler(flow, "Flow UniPC", shift=bad)
    with pytest.raises(ValueError, match="noise-prediction"):
        make_scheduler(pipes["v5"], "Flow UniPC")


@pytest.mark.parametrize("version,names", [("v5", list(NOISE_SCHEDULERS)), ("v5.1", list(FLOW_SCHEDULERS))])
def test_each_scheduler_is_the_one_that_runs(pipes, monkeypatch, version, names):
    ran = spy_scheduler_steps(monkeypatch)
    model = EasyAnimateModel(pipes[version])
    videos = {}
    for name in names:
        ran.clear()
        videos[name] = sample_video(model, SampleRequest("a dog", scheduler=name, steps=6, seed=2, **SMALL))
        expected = (NOISE_SCHEDULERS if version == "v5" else FLOW_SCHEDULERS)[name]
        assert set(ran) == {expected}, (name, ran)
        assert torch.isfinite(videos[name]).all()
    for a in names:  # every scheduler gives its own video
        for b in names:
            if a < b:
                assert (videos[a] - videos[b]).abs().max() > 2e-5, (a, b)  # DDIM vs Euler: 1e-4 measured


def test_step_counts_are_refused_before_any_work(pipes, monkeypatch):
    def no_encoding(*args, **kwargs):
        raise AssertionError("prompts were encoded before the step count was checked")

    monkeypatch.setattr(sampling, "encode_prompts", no_encoding)
    v5, v51 = EasyAnimateModel(pipes["v5"]), EasyAnimateModel(pipes["v5.1"])
    with pytest.raises(ValueError, match="needs at least 4 steps"):
        sample_video(v5, SampleRequest("a", scheduler="PNDM", steps=2, **SMALL))
    # DDIM with 'leading' spacing and steps_offset 1 would index timestep 1000 of 1000
    with pytest.raises(ValueError, match=r"DDIMScheduler cannot run 1000 steps.*IndexError"):
        sample_video(v5, SampleRequest("a", scheduler="DDIM", steps=1000, **SMALL))
    with pytest.raises(ValueError, match=r"UniPCMultistepScheduler cannot run 999 steps"):
        sample_video(v51, SampleRequest("a", scheduler="Flow UniPC", steps=999, **SMALL))
    for bad in (0, -3):
        with pytest.raises(ValueError, match="steps must be a whole number of at least 1"):
            sample_video(v51, SampleRequest("a", steps=bad, **SMALL))


def test_every_scheduler_runs_the_node_range(pipes):
    for version, names in (("v5", NOISE_SCHEDULERS), ("v5.1", FLOW_SCHEDULERS)):
        for name in names:
            low = 4 if name == "PNDM" else 1
            for steps in [*range(low, 9), 20, 30, 50, 100, 200]:
                check_steps(make_scheduler(pipes[version], name), steps)


# ------------------------------------------------------------------------------ TeaCache / cfg-skip

@pytest.mark.parametrize("version", ["v5", "v5.1"])
def test_teacache_computed_steps_equal_the_library_forward_bitwise(pipes, version):
    tr = pipes[version].transformer
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 2, 4, 4, generator=gen)
    inpaint = torch.randn(2, 17, 2, 4, 4, generator=gen)
    text = torch.randn(2, 7, tr.config.text_embed_dim, generator=gen)
    t5 = torch.randn(2, 5, tr.config.text_embed_dim_t5, generator=gen) if tr.config.text_embed_dim_t5 else None
    t = torch.tensor([700.0, 700.0])
    loop = LoopSpeedups(tr, SpeedSettings(teacache=True, teacache_threshold=0.0), total_steps=3)
    with torch.no_grad():
        expected = tr(latents, t, encoder_hidden_states=text, encoder_hidden_states_t5=t5, inpaint_latents=inpaint,
                      return_dict=False)[0]
        got = loop.forward(latents, t, encoder_hidden_states=text, encoder_hidden_states_t5=t5,
                           inpaint_latents=inpaint)[0]
    assert torch.equal(got, expected)
    assert loop.computed == 1 and loop.cached == 0


def test_teacache_skips_transformer_calls_and_threshold_zero_skips_none(pipes, block_calls):
    model = EasyAnimateModel(pipes["v5.1"])
    base = dict(steps=12, seed=3, **SMALL)
    plain = sample_video(model, SampleRequest("a cat", **base))
    assert len(block_calls["v5.1"]) == 12
    block_calls["v5.1"].clear()
    same = sample_video(model, SampleRequest("a cat", teacache=True, teacache_threshold=0.0, **base))
    assert len(block_calls["v5.1"]) == 12 and torch.equal(same, plain)
    counts = []
    for threshold in (0.1, 0.5):
        block_calls["v5.1"].clear()
        cached = sample_video(model, SampleRequest("a cat", teacache=True, teacache_threshold=threshold, **base))
        counts.append(len(block_calls["v5.1"]))
        assert not torch.equal(cached, plain)
        assert (cached - plain).abs().max() < 0.2  # measured 0.025 (0.1) and 0.11 (0.5)
    assert 12 > counts[0] > counts[1] >= 2  # first and last step always computed
    # teacache off: the threshold does nothing
    block_calls["v5.1"].clear()
    off = sample_video(model, SampleRequest("a cat", teacache=False, teacache_threshold=0.5, **base))
    assert len(block_calls["v5.1"]) == 12 and torch.equal(off, plain)


def test_teacache_coefficients_are_picked_from_the_config():
    from types import SimpleNamespace

    def fake(t5, layers):
        return SimpleNamespace(config={"text_embed_dim_t5": t5, "num_layers": layers}, transformer_blocks=[])

    assert teacache_coefficients(fake(None, 48))[0] == pytest.approx(-10.47857366)  # V5.1-12b
    assert teacache_coefficients(fake(None, 36))[0] == pytest.approx(1.07862322)  # V5.1-7b
    assert teacache_coefficients(fake(4096, 36))[0] == pytest.approx(-3.64204720e+03)  # V5-7b
    assert teacache_coefficients(fake(4096, 48)) == teacache_coefficients(fake(None, 48))  # official default


def test_cfg_skip_runs_only_the_conditional_branch_for_the_last_fraction(pipes, block_calls):
    model = EasyAnimateModel(pipes["v5"])
    base = dict(steps=10, seed=4, scheduler="DDIM", **SMALL)
    plain = sample_video(model, SampleRequest("a cat", **base))
    assert block_calls["v5"] == [2] * 10
    block_calls["v5"].clear()
    skipped = sample_video(model, SampleRequest("a cat", cfg_skip_ratio=0.3, **base))
    assert block_calls["v5"] == [2] * 7 + [1] * 3  # steps >= 10 * (1 - 0.3) run the conditional branch only
    assert not torch.equal(skipped, plain)
    with pytest.raises(ValueError, match="cfg_skip_ratio must be"):
        sample_video(model, SampleRequest("a cat", cfg_skip_ratio=1.5, **base))


def test_teacache_and_cfg_skip_together(pipes, block_calls):
    model = EasyAnimateModel(pipes["v5.1"])
    video = sample_video(model, SampleRequest("a cat", steps=12, seed=3, teacache=True, teacache_threshold=0.1,
                                              cfg_skip_ratio=0.25, **SMALL))
    rows = block_calls["v5.1"]
    assert torch.isfinite(video).all() and len(rows) < 12 and rows[-1] == 1 and rows[0] == 2


def test_speedups_are_off_in_training_and_stand_aside_on_grad_steps(pipes, block_calls):
    from easyanimate_reward.training.config import TrainConfig
    from easyanimate_reward.training.rollout import PromptBank, RolloutSettings, rollout_video

    assert not RolloutSettings().speed.active
    assert not RolloutSettings.from_config(TrainConfig()).speed.active
    on = RolloutSettings.from_config(TrainConfig(cfg_skip_ratio=0.5, teacache=True))
    assert on.speed.active and on.speed.cfg_skip_ratio == 0.5
    pipe = pipes["v5"]
    bank = PromptBank(pipe, ["a cat"])
    settings = RolloutSettings(width=32, height=32, frames=5, sampling_steps=6, scheduler="DDIM",
                               speed=SpeedSettings(cfg_skip_ratio=0.5))
    rollout_video(pipe, settings, bank.cond(["a cat"]), bank.uncond(1), [1], grad_steps={5})
    assert block_calls["v5"] == [2, 2, 2, 1, 1, 2]  # the grad step (5) runs both branches


# ------------------------------------------------------------------------------ seeds per video

def test_sampler_stochastic_seed_gives_the_same_video_in_any_batch(pipes):
    model = EasyAnimateModel(pipes["v5"])
    request = dict(scheduler="Euler A", steps=4, **SMALL)
    alone = sample_video(model, SampleRequest("a cat", seed=8, **request))
    batch = sample_video(model, SampleRequest("a cat", seed=7, videos=2, **request))
    assert torch.equal(batch[5:], alone)


# ------------------------------------------------------------------------------ previews

class LinearDecodeVAE(torch.nn.Module):
    """A stand-in VAE whose decode is a known affine map of the latent channels per 8x8 block."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.mix = torch.nn.Parameter(torch.randn(16, 3, generator=gen), requires_grad=False)
        self.true_weight = torch.randn(3, 16, generator=gen) * 0.02  # stays inside [0, 1]: no clamping
        self.true_bias = torch.tensor([0.5, 0.4, 0.6])
        self.config = type("Config", (), {"scaling_factor": 0.7})()

    def encode(self, video):
        pooled = torch.nn.functional.avg_pool3d(video, (1, 8, 8))  # (N, 3, 1, h, w)
        noise = torch.randn(pooled.shape[0], 16, *pooled.shape[2:], generator=torch.Generator().manual_seed(1))
        latents = torch.einsum("ncfhw,kc->nkfhw", pooled, self.mix) + noise
        return [type("Dist", (), {"mode": lambda self_: latents})()]

    def decode(self, latents, return_dict=False):
        rgb = torch.einsum("nkfhw,rk->nrfhw", latents * self.config.scaling_factor, self.true_weight)
        rgb = rgb + self.true_bias[None, :, None, None, None]
        return (rgb.repeat_interleave(8, -1).repeat_interleave(8, -2) * 2 - 1,)


def test_latent_preview_projection_is_a_least_squares_fit_of_the_vae_decode(pipes, monkeypatch):
    from types import SimpleNamespace

    stub = SimpleNamespace(vae=LinearDecodeVAE(), dtype=torch.float32, placement=pipes["v5"].placement,
                           folder=pipes["v5"].folder)
    monkeypatch.setattr(preview, "_vae_identity", lambda pipe: ("stub", id(pipe.vae)))
    projection = preview.fit_latent_rgb(stub)
    assert torch.allclose(projection.weight, stub.vae.true_weight, atol=1e-6)  # measured 3e-8
    assert torch.allclose(projection.bias, stub.vae.true_bias, atol=1e-4)
    latents = torch.randn(1, 16, 3, 4, 4)
    strip = preview.preview_frames(latents, projection)
    assert strip.shape == (4, 12, 3) and strip.dtype == torch.uint8  # 3 latent frames side by side
    expected = (stub.vae.decode(latents / 0.7)[0][0, :, 0, ::8, ::8].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1)
    assert (strip[:, :4].float() / 255 - expected).abs().max() <= 0.5 / 255 + 1e-6


def test_latent_preview_projection_is_fitted_once_per_model_folder(pipes, tiny_models):
    pipe = pipes["v5.1"]
    projection = preview.fit_latent_rgb(pipe)
    fits = preview.fits
    assert preview.fit_latent_rgb(pipe) is projection
    assert preview.fit_latent_rgb(load_pipe(tiny_models["v5.1"], "fp32", "none")) is projection  # reloaded folder
    assert preview.fits == fits
    assert projection.weight.shape == (3, 16) and projection.bias.shape == (3,)
    assert preview.fit_latent_rgb(pipes["v5"]) is not projection  # another folder's own VAE


def test_step_callback_gets_the_denoised_estimate(pipes):
    model = EasyAnimateModel(pipes["v5.1"])
    seen = []
    sample_video(model, SampleRequest("a cat", steps=4, seed=1, **SMALL), lambda i, n, x: seen.append(x))
    assert len(seen) == 4 and seen[0].shape == (1, 16, 2, 4, 4)
    # with flow Euler the estimate after the last step is the final latent itself; earlier ones move towards it
    final = seen[-1]
    errors = [float((x - final).abs().mean()) for x in seen]
    assert errors[-1] == 0 and errors[0] > errors[-2]
