"""fp16 on V5 models: VAE in float32 and attention in float32, as the official loader asks; V5.1
and bf16 are left alone."""

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from easyanimate_reward.easyanimate.loading import load_pipe
from easyanimate_reward.easyanimate.model import EasyAnimateModel
from easyanimate_reward.easyanimate.precision import UpcastAttnProcessor
from easyanimate_reward.easyanimate.sampling import SampleRequest, sample_video


class AttentionDtypes(TorchFunctionMode):
    """The dtypes scaled_dot_product_attention sees inside the transformer (not the text encoders)."""

    def __init__(self, transformer):
        super().__init__()
        self.seen, self.inside = [], False
        transformer.register_forward_pre_hook(lambda *a: setattr(self, "inside", True))
        transformer.register_forward_hook(lambda *a: setattr(self, "inside", False))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention and self.inside:
            self.seen.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def _processors(pipe):
    from diffusers.models.attention_processor import Attention

    return [m.processor for m in pipe.transformer.modules() if isinstance(m, Attention)]


def test_v5_in_fp16_upcasts_vae_and_attention(tiny_models):
    pipe = load_pipe(tiny_models["v5"], "fp16", "none")
    assert next(pipe.transformer.parameters()).dtype == torch.float16
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}
    processors = _processors(pipe)
    assert processors and all(isinstance(p, UpcastAttnProcessor) for p in processors)
    with AttentionDtypes(pipe.transformer) as spy:
        video = sample_video(EasyAnimateModel(pipe), SampleRequest("a cat", width=32, height=32, frames=5, steps=2,
                                                                   start_image=torch.rand(3, 32, 32)))
    assert spy.seen and set(spy.seen) == {torch.float32}
    assert torch.isfinite(video).all() and video.shape == (5, 32, 32, 3)


def test_v51_fp16_and_v5_bf16_are_left_alone(tiny_models):
    v51 = load_pipe(tiny_models["v5.1"], "fp16", "none")
    assert {p.dtype for p in v51.vae.parameters()} == {torch.float16}
    assert not any(isinstance(p, UpcastAttnProcessor) for p in _processors(v51))
    v5 = load_pipe(tiny_models["v5"], "bf16", "none")
    assert {p.dtype for p in v5.vae.parameters()} == {torch.bfloat16}
    with AttentionDtypes(v5.transformer) as spy:
        sample_video(EasyAnimateModel(v5), SampleRequest("a cat", width=32, height=32, frames=1, steps=1))
    assert set(spy.seen) == {torch.bfloat16}
