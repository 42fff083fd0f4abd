"""Regressions of the sampler found on 16a666f (issue 9 item 15; issue 11 seeds per video). This file
imports only what existed there, so it runs on that commit and fails for the reason named."""

import pytest
import torch

from easyanimate_reward.easyanimate.loading import load_pipe
from easyanimate_reward.easyanimate.model import EasyAnimateModel
from easyanimate_reward.easyanimate.sampling import SampleRequest, sample_video

SMALL = dict(width=32, height=32, frames=5)


@pytest.fixture(scope="module")
def pipes(tiny_models):
    return {v: load_pipe(f, "fp32", "none") for v, f in tiny_models.items()}


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_pndm_with_fewer_than_4_steps_is_refused_with_the_minimum(pipes, steps):
    """Issue 9 item 15. On 16a666f this raised numpy's 'operands could not be broadcast together'."""
    model = EasyAnimateModel(pipes["v5"])
    with pytest.raises(ValueError, match="PNDM.* needs at least 4 steps"):
        sample_video(model, SampleRequest("a dog", scheduler="PNDM", steps=steps, **SMALL))


def test_rollout_stochastic_sampler_seed_gives_the_same_video_in_any_batch(pipes):
    """On 16a666f the batch drew all its sampler noise from one generator seeded by the first seed."""
    from easyanimate_reward.training.rollout import PromptBank, RolloutSettings, rollout_video

    pipe = pipes["v5"]
    bank = PromptBank(pipe, ["a cat", "a dog"])
    settings = RolloutSettings(width=32, height=32, frames=5, sampling_steps=5, scheduler="Euler A")
    with torch.no_grad():
        alone = rollout_video(pipe, settings, bank.cond(["a dog"]), bank.uncond(1), [5])
        batch = rollout_video(pipe, settings, bank.cond(["a cat", "a dog"]), bank.uncond(2), [9, 5])
    assert (batch[1:] - alone).abs().max() < 1e-5  # measured 0 (batched float math only)


def test_pndm_with_2_steps_on_the_host_names_the_minimum(comfy_server):
    """Issue 9 item 15 through the real server: the node's error says what PNDM needs."""
    from host import history_error
    from test_host_foundation import t2v_graph

    entry = comfy_server.run(t2v_graph("tiny-EasyAnimateV5-zh-InP", extra_sampler={"scheduler": "PNDM", "steps": 2}))
    err = history_error(entry)
    assert err is not None and "needs at least 4 steps" in err, err
    entry = comfy_server.run(t2v_graph("tiny-EasyAnimateV5-zh-InP", extra_sampler={"scheduler": "PNDM", "steps": 4}))
    assert history_error(entry) is None, history_error(entry)
