"""Issue 9 item 5 (VAE part): Cancel stops the VAE within one latent/frame chunk, and a decode
after an interrupted one equals a clean decode (the Magvit causal cache is reset in `finally`).
Plain sampling entry points only (decode_latents, inpaint_condition), so these run on any tree."""


import pytest
import torch

from easyanimate_reward.easyanimate.cancel import cancel_check
from easyanimate_reward.easyanimate.sampling import decode_latents, inpaint_condition, latent_shape
from easyanimate_reward.easyanimate.tiny import build_tiny_vae
from vae_helpers import CallSpy, Interrupted, make_pipe, seeded_latents


@pytest.fixture(scope="module")
def vae():
    return build_tiny_vae(seed=1).eval()


def forwards_when_cancelled_after_two(module, run) -> int:
    """Runs `run()` with Cancel pressed once `module` has run twice (the check raises between
    chunks); returns how many forwards of `module` ran in all."""
    spy = CallSpy(module)

    def interrupt_after_two_chunks():
        if spy.calls >= 2:
            raise Interrupted("cancel pressed")

    try:
        with cancel_check(interrupt_after_two_chunks), pytest.raises(Interrupted, match="cancel pressed"):
            run()
    finally:
        spy.remove()
    return spy.calls


def test_cancel_during_decode_stops_before_the_next_latent_chunk(vae):
    latents = seeded_latents(frames=5)  # 5 latent frames = 5 decoder chunks
    pipe = make_pipe(vae, vae_budget_bytes=None)
    assert forwards_when_cancelled_after_two(
        vae.decoder, lambda: decode_latents(pipe, latents * vae.config.scaling_factor)) == 2


def test_decode_after_an_interrupted_one_equals_a_clean_decode(vae):
    pipe = make_pipe(vae, vae_budget_bytes=None)
    latents = seeded_latents(frames=4, seed=3) * vae.config.scaling_factor
    clean = decode_latents(pipe, latents)
    spy = CallSpy(vae.decoder, fail_at=3)  # dies inside the third chunk, causal cache filled
    try:
        with pytest.raises(Interrupted):
            decode_latents(pipe, seeded_latents(frames=4, seed=4) * vae.config.scaling_factor)
    finally:
        spy.remove()
    assert torch.equal(decode_latents(pipe, latents), clean)


def test_cancel_during_encode_stops_before_the_next_frame_chunk(vae):
    pipe = make_pipe(vae, vae_budget_bytes=None)
    shape = latent_shape(1, 48, 48, 13)  # the encoder runs 1 + 4 + 4 + 4 frames: 4 chunks
    image = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    clean = inpaint_condition(pipe, shape, 13, image, [0])
    assert forwards_when_cancelled_after_two(vae.encoder, lambda: inpaint_condition(pipe, shape, 13, image, [0])) == 2
    assert torch.equal(inpaint_condition(pipe, shape, 13, image, [0]), clean)  # cache reset after the stop


