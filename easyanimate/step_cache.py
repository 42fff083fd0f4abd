"""Inference speed-ups of the denoise loop: TeaCache-style step caching and cfg-skip.

TeaCache (Liu et al., arXiv 2411.19108; EasyAnimate's transformer ships it): at each step the
first block's timestep-modulated input is compared with the previous step's (relative L1). A
polynomial fitted per model maps that distance to an estimate of how much the transformer's output
changes; the estimates are summed over steps and, while the sum stays below `teacache_threshold`,
the block stack is skipped and the previous step's residual (output of `norm_out` minus the
patch-embedded input) is added to this step's input instead. The first and last steps are always
computed, as in the official code. Where the polynomial goes non-positive (far outside the range
it was fitted on) the step is computed.

cfg-skip (VideoX-Fun's `cfg_skip_ratio`): for the last `cfg_skip_ratio` of the steps
(step index >= steps * (1 - ratio)) only the conditional branch runs, which halves the batch
through the transformer; the guided prediction there is the conditional one.

Both are inference only: steps that keep a graph (reward training) always run in full, and the
trainer, held-out evaluation and sweeps keep them off unless their settings turn them on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Facts from the official EasyAnimate code (easyanimate/models/transformer3d.py,
# get_teacache_coefficients), keyed here by (model version, transformer blocks) read from the
# transformer's own config: 12b models have 48 blocks, 7b models 36.
TEACACHE_COEFFICIENTS = {
    ("v5.1", 48): (-10.47857366, 8.33844143, -0.78477557, 0.68798618, 0.0136149),  # V5.1-12b (also its Control)
    ("v5.1", 36): (1.07862322, -4.19362456, 3.06725828, 0.33161686, 0.02374758),  # V5.1-7b (also its Control)
    ("v5", 36): (-3.64204720e+03, 1.43764725e+03, -1.93045263e+02, 1.09596499e+01, -1.70663507e-01),  # V5-7b
}
# The official ComfyUI nodes use the V5.1-12b polynomial for every model (enable_teacache's
# default); so does the pack where no polynomial was fitted (V5-12b, tiny test models).
DEFAULT_COEFFICIENTS = ("v5.1", 48)
DEFAULT_TEACACHE_THRESHOLD = 0.10  # the official nodes' default (0.08 in its Gradio app)


@dataclass(frozen=True)
class SpeedSettings:
    teacache: bool = False
    teacache_threshold: float = DEFAULT_TEACACHE_THRESHOLD
    cfg_skip_ratio: float = 0.0  # 0 = off

    def validate(self) -> "SpeedSettings":
        if not isinstance(self.teacache_threshold, (int, float)) or not math.isfinite(self.teacache_threshold) \
                or not 0 <= self.teacache_threshold <= 10:
            raise ValueError(f"teacache_threshold must be a number in [0, 10]; got {self.teacache_threshold!r}")
        if not isinstance(self.cfg_skip_ratio, (int, float)) or not math.isfinite(self.cfg_skip_ratio) \
                or not 0 <= self.cfg_skip_ratio <= 1:
            raise ValueError(f"cfg_skip_ratio must be a number in [0, 1]; got {self.cfg_skip_ratio!r}")
        return self

    @property
    def active(self) -> bool:
        return bool(self.teacache) or self.cfg_skip_ratio > 0


def model_key(transformer) -> tuple[str, int]:
    """(version, blocks) of a transformer: V5 has a T5 text projection, V5.1 does not."""
    config = transformer.config
    version = "v5" if config.get("text_embed_dim_t5") else "v5.1"
    return version, int(config.get("num_layers", len(transformer.transformer_blocks)))


def teacache_coefficients(transformer) -> tuple[float, ...]:
    return TEACACHE_COEFFICIENTS.get(model_key(transformer), TEACACHE_COEFFICIENTS[DEFAULT_COEFFICIENTS])


def _polynomial(coefficients, x: float) -> float:
    value = 0.0
    for c in coefficients:  # highest power first, as numpy.poly1d
        value = value * x + c
    return value


def _rows(tensor: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """`tensor` for a batch of `batch` rows: itself, or its conditional half when the previous step
    ran both CFG branches ([uncond, cond]) and this one only the conditional (cfg-skip)."""
    if tensor is None:
        return None
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 2 * batch:
        return tensor[batch:]
    return None


class LoopSpeedups:
    """The speed-up state of one denoise loop over `total_steps` transformer steps."""

    def __init__(self, transformer, settings: SpeedSettings, total_steps: int, coefficients=None):
        self.transformer = transformer
        self.settings = settings.validate()
        self.total_steps = total_steps
        self.coefficients = tuple(coefficients or teacache_coefficients(transformer))
        self.step = 0
        self.keep_graph = False
        self._accumulated = 0.0
        self._previous_input: torch.Tensor | None = None
        self._residual: torch.Tensor | None = None
        self.computed = 0  # block-stack passes
        self.cached = 0  # steps that reused the residual
        self.uncond_skipped = 0  # steps that ran the conditional branch only

    def begin(self, step: int, keep_graph: bool) -> None:
        self.step, self.keep_graph = step, keep_graph

    def skip_uncond(self) -> bool:
        ratio = self.settings.cfg_skip_ratio
        skip = ratio > 0 and not self.keep_graph and self.step >= self.total_steps * (1 - ratio)
        self.uncond_skipped += int(skip)
        return skip

    def _should_compute(self, modulated: torch.Tensor) -> bool:
        previous = _rows(self._previous_input, modulated.shape[0])
        self._previous_input = modulated.detach()
        residual = _rows(self._residual, modulated.shape[0])
        if self.step == 0 or self.step >= self.total_steps - 1 or previous is None or residual is None:
            self._accumulated = 0.0
            return True
        distance = ((modulated - previous).abs().mean() / previous.abs().mean()).item()
        estimate = _polynomial(self.coefficients, distance)
        if not math.isfinite(estimate) or estimate <= 0:
            self._accumulated = 0.0
            return True
        self._accumulated += estimate
        if self._accumulated < self.settings.teacache_threshold:
            return False
        self._accumulated = 0.0
        return True

    def forward(self, hidden_states, timestep, timestep_cond=None, encoder_hidden_states=None,
                encoder_hidden_states_t5=None, inpaint_latents=None, control_latents=None, return_dict=False):
        """The transformer's forward (same arguments, tuple output), with TeaCache when it is on."""
        tr = self.transformer
        if not self.settings.teacache or self.keep_graph:
            self._previous_input = self._residual = None  # the next step computes again
            self.computed += 1
            return tr(hidden_states, timestep, timestep_cond=timestep_cond, encoder_hidden_states=encoder_hidden_states,
                      encoder_hidden_states_t5=encoder_hidden_states_t5, inpaint_latents=inpaint_latents,
                      control_latents=control_latents, return_dict=False)
        # Steps 1-3 of diffusers' EasyAnimateTransformer3DModel.forward (0.42.1), unchanged; a test
        # pins that a computed step equals the library's forward bitwise.
        batch, channels, frames, height, width = hidden_states.shape
        p = tr.config.patch_size
        temb = tr.time_embedding(tr.time_proj(timestep).to(dtype=hidden_states.dtype), timestep_cond)
        rotary = tr.rope_embedding(hidden_states)
        x = hidden_states
        for extra in (inpaint_latents, control_latents):
            if extra is not None:
                x = torch.concat([x, extra], 1)
        x = tr.proj(x.permute(0, 2, 1, 3, 4).flatten(0, 1))
        x = x.unflatten(0, (batch, -1)).permute(0, 2, 1, 3, 4).flatten(2, 4).transpose(1, 2)
        text = tr.text_proj(encoder_hidden_states)
        if encoder_hidden_states_t5 is not None:
            text = torch.cat([text, tr.text_proj_t5(encoder_hidden_states_t5)], dim=1).contiguous()
        modulated = tr.transformer_blocks[0].norm1(x, text, temb)[0]
        if self._should_compute(modulated):
            h = x
            for block in tr.transformer_blocks:
                h, text = block(h, text, temb, rotary)
            h = tr.norm_out(tr.norm_final(h), temb=temb)
            self._residual = (h - x).detach()
            self.computed += 1
        else:
            h = x + _rows(self._residual, batch)
            self.cached += 1
        h = tr.proj_out(h)
        out = h.reshape(batch, frames, height // p, width // p, channels, p, p)
        return (out.permute(0, 4, 1, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4),)
