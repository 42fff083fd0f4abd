"""Issue 9 item 5 (VAE part): Cancel stops the VAE within one latent/frame chunk, and a decode
after an interrupted one equals a clean decode (the Magvit causal cache is reset in `finally`).
Plain sampling entry points only (decode_latents, inpaint_condition), so these run on any tree."""


import pytest
import torch

from easyanimate_reward.easyanimate.cancel import cancel_check
from easyanimate_reward.easyanimate.sampling import decode_latents, inpaint_condition, latent_shape
from easyanimate_reward.easyanimate.tiny import build_tiny_vae
from vae_helpers import CallSpy, Interrupted, make_pipe, seeded_latents


def chunks_before_cancel(module, after: int, work) -> int:
    """Run `work` with Cancel pressed once `module` ran `after` times; how many times it ran."""
    spy = CallSpy(module)

    def interrupt():
        if spy.calls >= after:
            raise Interrupted("cancel pressed")

    try:
        with cancel_check(interrupt), pytest.raises(Interrupted, match="cancel pressed"):
            work()
    finally:
        spy.remove()
    return spy.calls


@pytest.fixture(scope="module")
def vae():
    return build_tiny_vae(seed=1).eval()


def test_cancel_during_decode_stops_before_the_next_latent_chunk(vae):
    latents = seeded_latents(frames=5)  # 5 latent frames = 5 decoder chunks
    calls = chunks_before_cancel(vae.decoder, 2, lambda: decode_latents(make_pipe(vae, vae_budget_bytes=None),
                                                                          latents * vae.config.scaling_factor))
    assert calls == 2


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
    calls = chunks_before_cancel(vae.encoder, 2, lambda: inpaint_condition(pipe, shape, 13, image, [0]))
    assert calls == 2
    assert torch.equal(inpaint_condition(pipe, shape, 13, image, [0]), clean)  # cache reset after the stop


