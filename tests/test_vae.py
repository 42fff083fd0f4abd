"""VAE decode/encode (easyanimate/vae.py): Cancel between chunks and tiles, a clean causal cache
after an interrupted call, tiling and slicing parity, and plans chosen from a memory budget."""

from types import SimpleNamespace

import pytest
import torch

from easyanimate_reward.easyanimate.cancel import cancel_check
from easyanimate_reward.easyanimate.sampling import decode_latents
from easyanimate_reward.easyanimate.tiny import build_tiny_vae
from vae_helpers import CallSpy, Interrupted, make_pipe, seeded_latents
from easyanimate_reward.easyanimate.vae import (
    UNTILED,
    VaePlan,
    plan_vae,
    tile_count,
    vae_decode,
    vae_encode_mode,
    vae_peak_bytes,
)


@pytest.fixture(scope="module")
def vae():
    return build_tiny_vae(seed=1).eval()


def test_cancel_is_checked_between_tiles(vae):
    plan = VaePlan(tile=4, overlap=2)
    latents = seeded_latents(frames=1, h=8, w=8)  # one latent frame: one decoder call per tile
    assert tile_count(8, 8, plan) == 9
    spy = CallSpy(vae.decoder)

    def interrupt_after_one_tile():
        if spy.calls >= 1:
            raise Interrupted("cancel pressed")

    try:
        with cancel_check(interrupt_after_one_tile), pytest.raises(Interrupted):
            vae_decode(vae, latents, plan)
    finally:
        spy.remove()
    assert spy.calls == 1


@torch.no_grad()
def test_untiled_paths_compute_what_diffusers_computes(vae):
    latents = seeded_latents(frames=3, h=6, w=8, batch=2)
    assert torch.equal(vae_decode(vae, latents, UNTILED), vae.decode(latents, return_dict=False)[0])
    video = torch.rand(2, 3, 9, 48, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.equal(vae_encode_mode(vae, video, UNTILED), vae.encode(video)[0].mode())
    # one video at a time: the same per video (batched convolutions round a little differently)
    sliced = vae_decode(vae, latents, VaePlan(slice_batch=True))
    assert (sliced - vae.decode(latents, return_dict=False)[0]).abs().max() < 1e-4  # measured 1.0e-5


@torch.no_grad()
def test_tiled_decode_and_encode_match_untiled_within_the_measured_tolerance(vae):
    """The tiny random VAE has strong border effects (zero padding, group norm over each tile), so
    tiles differ from whole frames near seams. Measured on this model (seed 1), 16x16 latents,
    tile 12 / overlap 6: decode mean |err| 0.051 against an output std of 0.33 (correlation
    0.973); encode of 96x96 px, tile 8 / overlap 4: mean |err| 0.039 against a mean |latent| of
    0.17 (correlation 0.967)."""
    latents = seeded_latents(frames=1, h=16, w=16, seed=5)
    whole = vae.decode(latents, return_dict=False)[0]
    plan = VaePlan(tile=12, overlap=6)
    spy = CallSpy(vae.decoder)
    try:
        tiled = vae_decode(vae, latents, plan)
    finally:
        spy.remove()
    assert spy.calls == tile_count(16, 16, plan) == 4  # tiling engaged
    assert tiled.shape == whole.shape
    err = (tiled - whole).abs().mean().item()
    corr = torch.corrcoef(torch.stack([tiled.flatten(), whole.flatten()]))[0, 1].item()
    assert err < 0.06 and corr > 0.965, (err, corr)

    video = torch.rand(1, 3, 1, 96, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    whole_z = vae.encode(video)[0].mode()
    spy = CallSpy(vae.encoder)
    try:
        tiled_z = vae_encode_mode(vae, video, VaePlan(tile=8, overlap=4))
    finally:
        spy.remove()
    assert spy.calls == 4 and tiled_z.shape == whole_z.shape
    err = (tiled_z - whole_z).abs().mean().item()
    corr = torch.corrcoef(torch.stack([tiled_z.flatten(), whole_z.flatten()]))[0, 1].item()
    assert err < 0.047 and corr > 0.96, (err, corr)


def test_plans_follow_the_memory_budget(vae):
    args = (1, 384, 384, 49, torch.bfloat16)
    untiled = vae_peak_bytes(vae, *args)
    assert plan_vae(vae, *args, budget_bytes=None) == UNTILED
    assert plan_vae(vae, *args, budget_bytes=untiled) == UNTILED
    budget = untiled * 3 // 5  # the tiles' float32 blend buffer is a large part on the 8-channel tiny VAE
    plan = plan_vae(vae, *args, budget_bytes=budget)
    assert plan.tiled and 8 < plan.tile < 384 // 8 and vae_peak_bytes(vae, *args, plan) <= budget
    two = (2, 384, 384, 49, torch.bfloat16)
    assert plan_vae(vae, *two, budget_bytes=vae_peak_bytes(vae, *two) - 1) == VaePlan(slice_batch=True)
    # the real Magvit VAE (block_out_channels[0] = 128): 4.8 GiB for a 384x672 chunk, as measured
    real = SimpleNamespace(config=SimpleNamespace(block_out_channels=[128, 256, 512, 512], latent_channels=16,
                                                  out_channels=3))
    activations = vae_peak_bytes(real, 1, 384, 672, 49, torch.bfloat16) - 3 * 49 * 384 * 672 * 2
    assert abs(activations / 2**30 - 4.8) < 0.05


def test_decode_latents_tiles_when_the_budget_needs_it(vae):
    latents = seeded_latents(frames=1, h=16, w=16) * vae.config.scaling_factor
    budget = vae_peak_bytes(vae, 1, 128, 128, 1, torch.float32) // 2
    spy = CallSpy(vae.decoder)
    try:
        decode_latents(make_pipe(vae, vae_budget_bytes=budget), latents)
    finally:
        spy.remove()
    plan = plan_vae(vae, 1, 128, 128, 1, torch.float32, budget)
    assert plan.tiled and spy.calls == tile_count(16, 16, plan) > 1
