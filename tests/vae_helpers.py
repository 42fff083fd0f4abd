"""Stand-ins shared by the VAE tests: a pipe around a bare VAE, a forward spy, seeded latents."""

from types import SimpleNamespace

import torch

from easyanimate_reward.easyanimate.memory import ModulePlacement


class Interrupted(Exception):
    pass


def make_pipe(vae, vae_budget_bytes="auto"):
    """Just what the VAE helpers and inpaint_condition read of a pipe (an InP model's channels)."""
    transformer = SimpleNamespace(config=SimpleNamespace(add_noise_in_inpaint_model=False, in_channels=33))
    return SimpleNamespace(vae=vae, transformer=transformer, dtype=torch.float32, vae_budget_bytes=vae_budget_bytes,
                           placement=ModulePlacement("none", "cpu"), compute_device=torch.device("cpu"))


class CallSpy:
    """Counts forwards of a submodule; optionally raises from inside the forward number `fail_at`."""

    def __init__(self, module, fail_at=None):
        self.calls, self.fail_at = 0, fail_at
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Interrupted("raised inside the VAE")

    def remove(self):
        self.handle.remove()


def seeded_latents(frames=5, h=6, w=6, batch=1, seed=0):
    return torch.randn((batch, 16, frames, h, w), generator=torch.Generator().manual_seed(seed))
