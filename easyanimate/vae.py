"""Decode and encode with the Magvit VAE in bounded memory, cancellable, and with a clean cache.

diffusers' `AutoencoderKLMagvit.decode` runs the decoder one latent frame at a time (the first frame
alone, then `num_latent_frames_batch_size` latents per chunk), and `encode` runs the encoder on the
first frame, then `num_sample_frames_batch_size` frames per chunk. Its causal convolutions carry
the previous chunk's features in `prev_features`, which it clears only when a call returns
normally: an interrupted decode left them behind and the next decode started from them. Its
spatial tiling starts at 512 px, so it never engages at the 256-384 px sizes most runs use.

This module drives the same submodules (post_quant_conv / decoder, encoder / quant_conv) chunk by
chunk itself, so that:
- `check_cancel()` runs before every chunk of every tile (Cancel stops within one chunk);
- the causal cache is cleared before the first chunk and in `finally` (and between tiles);
- spatial tiles and batch slices are chosen from a memory budget (`plan_vae`), not a fixed size;
  tiles overlap and are blended with linear ramps (weighted average), every tile has full size
  (the last one is aligned with the far edge);
- the untiled, unsliced path computes exactly what `vae.decode` / `vae.encode` compute.

Peak estimate (`vae_peak_bytes`): live activations grow linearly with the pixels of one chunk
(frames x height x width of a tile) times the width of the VAE's full-resolution stage
(`block_out_channels[0]`). The constant is calibrated on the real V5/V5.1 Magvit VAE in bf16 under
fake tensors (4.8 GiB of live activations for a 384x672 chunk of 4 output frames untiled, 3.7 GiB
for its 384x512 diffusers tile, both linear in pixels: about 19.5 element copies of the widest
full-resolution feature map per output pixel). The encoder is assumed to need the same per pixel
of its chunk. easyanimate/preflight.py may calibrate further; it calls `plan_vae` with its budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cancel import check_cancel

# Element copies of the full-resolution feature map (block_out_channels[0] channels) live at the
# peak of one chunk, per output pixel per output frame; see the module docstring.
ACTIVATION_COPIES = 19.5
MIN_TILE_LATENT = 8  # smallest tile a budget may choose (64 px): below it the overlap dominates
DEFAULT_OVERLAP_FRACTION = 0.25


@dataclass(frozen=True)
class VaePlan:
    """How to run the VAE: `tile` = tile edge in latent pixels (None: whole frames), `overlap` =
    overlap of neighbouring tiles in latent pixels, `slice_batch` = one video at a time."""

    tile: int | None = None
    overlap: int = 0
    slice_batch: bool = False

    def __post_init__(self):
        if self.tile is not None:
            if self.tile < 2:
                raise ValueError(f"VAE tile must be at least 2 latent pixels, got {self.tile}")
            if not 0 <= self.overlap < self.tile:
                raise ValueError(f"VAE tile overlap must be in [0, tile), got {self.overlap} for tile {self.tile}")

    @property
    def tiled(self) -> bool:
        return self.tile is not None


UNTILED = VaePlan()


def _config(vae):
    return getattr(vae, "config", vae)


def _ratios(vae) -> tuple[int, int]:
    blocks = len(_config(vae).block_out_channels)
    return 2 ** (blocks - 1), 2 ** (blocks - 2)  # spatial, temporal (as AutoencoderKLMagvit computes them)


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def vae_peak_bytes(vae, batch: int, height: int, width: int, frames: int, dtype: torch.dtype,
                   plan: VaePlan = UNTILED, encode: bool = False) -> int:
    """Estimated peak device bytes of one decode (or encode) of `batch` videos of frames x height x
    width pixels under `plan`: the activations of the largest chunk plus the assembled output.
    `vae` may be the module or its config (no weights needed)."""
    spatial, temporal = _ratios(vae)
    cfg = _config(vae)
    width0 = cfg.block_out_channels[0]
    chunk_latents = getattr(vae, "num_latent_frames_batch_size", 1)
    chunk_frames = getattr(vae, "num_sample_frames_batch_size", 4) if encode else chunk_latents * temporal
    chunk_frames = min(chunk_frames, max(1, frames))
    tile_h = height if not plan.tiled else min(height, plan.tile * spatial)
    tile_w = width if not plan.tiled else min(width, plan.tile * spatial)
    per_video = ACTIVATION_COPIES * width0 * chunk_frames * tile_h * tile_w
    activations = per_video * (1 if plan.slice_batch else batch)
    if encode:
        latent_frames = (frames - 1) // temporal + 1
        result = batch * 2 * cfg.latent_channels * latent_frames * (height // spatial) * (width // spatial)
    else:
        result = batch * cfg.out_channels * frames * height * width
    # tiles are blended in float32
    result_bytes = result * (4 if plan.tiled else _dtype_bytes(dtype))
    return int(activations * _dtype_bytes(dtype) + result_bytes)


def plan_vae(vae, batch: int, height: int, width: int, frames: int, dtype: torch.dtype,
             budget_bytes: int | None, encode: bool = False) -> VaePlan:
    """The cheapest plan whose estimate fits `budget_bytes` (None: no limit): whole frames if they
    fit, else one video at a time, else the largest square tile (with 1/4 overlap) that fits; the
    smallest tile (MIN_TILE_LATENT) when nothing fits (the pre-flight refuses such requests)."""
    if budget_bytes is None:
        return UNTILED

    def fits(plan: VaePlan) -> bool:
        return vae_peak_bytes(vae, batch, height, width, frames, dtype, plan, encode) <= budget_bytes

    if fits(UNTILED):
        return UNTILED
    slice_batch = batch > 1
    if slice_batch and fits(VaePlan(slice_batch=True)):
        return VaePlan(slice_batch=True)
    spatial, _ = _ratios(vae)
    largest = max(height, width) // spatial
    if largest <= MIN_TILE_LATENT:  # too small for tiles to save anything
        return VaePlan(slice_batch=slice_batch)
    tile = largest
    while tile > MIN_TILE_LATENT:
        candidate = _tiled(tile, slice_batch)
        if fits(candidate):
            return candidate
        tile = max(MIN_TILE_LATENT, int(tile * 0.85))
    return _tiled(MIN_TILE_LATENT, slice_batch)


def _tiled(tile: int, slice_batch: bool) -> VaePlan:
    return VaePlan(tile=tile, overlap=max(1, int(tile * DEFAULT_OVERLAP_FRACTION)), slice_batch=slice_batch)


def device_budget_bytes(device: torch.device | str) -> int:
    """Memory the VAE may use on `device` now: free accelerator memory (plus what PyTorch's
    allocator holds unused) with a 10% margin; on the CPU half the available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(0.9 * (free + cached))
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:  # psutil comes with ComfyUI; plain Python may lack it
        import os

        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(0.5 * available)


def vae_budget(pipe) -> int | None:
    """The budget a pipe's VAE plans for: `pipe.vae_budget_bytes` = "auto" (default:
    `device_budget_bytes` of the compute device, measured at each call), None (never tile or
    slice) or a number of bytes."""
    budget = getattr(pipe, "vae_budget_bytes", "auto")  # stand-in pipes (tests) may leave it out
    if budget == "auto":
        return device_budget_bytes(pipe.compute_device)
    return None if budget is None else int(budget)


# -- running the VAE -------------------------------------------------------------------------------

def _positions(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one axis: every tile has full size, the last one ends at the edge."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(size: int, ramp: int, rise: bool, fall: bool, device) -> torch.Tensor:
    weight = torch.ones(size, dtype=torch.float32, device=device)
    ramp = min(ramp, size)
    if ramp > 0:
        steps = (torch.arange(ramp, dtype=torch.float32, device=device) + 0.5) / ramp
        if rise:
            weight[:ramp] = torch.minimum(weight[:ramp], steps)
        if fall:
            weight[size - ramp:] = torch.minimum(weight[size - ramp:], steps.flip(0))
    return weight


def _tiles(height: int, width: int, plan: VaePlan):
    """(row slice, column slice, row index, rows, column index, columns) in the input's pixels."""
    rows = _positions(height, plan.tile, plan.overlap)
    cols = _positions(width, plan.tile, plan.overlap)
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            yield (slice(top, min(height, top + plan.tile)), slice(left, min(width, left + plan.tile)),
                   i, len(rows), j, len(cols))


def _blend_weight(h: int, w: int, ramp: int, i: int, rows: int, j: int, cols: int, device) -> torch.Tensor:
    wy = _ramp(h, ramp, i > 0, i < rows - 1, device)
    wx = _ramp(w, ramp, j > 0, j < cols - 1, device)
    return wy[:, None] * wx[None, :]


def _causal_chunks(vae, module, x: torch.Tensor, step: int) -> torch.Tensor:
    """`module` over frame 0 alone, then `step` frames at a time, as diffusers' untiled Magvit
    paths do. Cancel is checked before each chunk; the causal cache is cleared before the first
    chunk and again however the loop ends, so the next call starts clean."""
    starts = [0, *range(1, x.shape[2], step)]
    out = []
    vae._clear_conv_cache()
    try:
        for k, start in enumerate(starts):
            check_cancel()
            stop = 1 if k == 0 else start + step
            out.append(module(x[:, :, start:stop]))
    finally:
        vae._clear_conv_cache()
    return torch.cat(out, dim=2)


def _decode_frames(vae, z: torch.Tensor) -> torch.Tensor:
    """What diffusers' untiled `_decode` computes, chunk by chunk."""
    return _causal_chunks(vae, vae.decoder, vae.post_quant_conv(z), vae.num_latent_frames_batch_size)


def _encode_moments(vae, x: torch.Tensor) -> torch.Tensor:
    """What diffusers' untiled `_encode` computes (moments, before the Gaussian), chunk by chunk."""
    return vae.quant_conv(_causal_chunks(vae, vae.encoder, x, vae.num_sample_frames_batch_size))


def _run_tiled(run, inp: torch.Tensor, plan: VaePlan, scale_in: int, scale_out: int) -> torch.Tensor:
    """Run `run` on overlapping spatial tiles of `inp` and blend. Tiles are `plan.tile` latent
    pixels; `scale_in` / `scale_out` are the input's and output's pixels per latent pixel."""
    height, width = inp.shape[-2] // scale_in, inp.shape[-1] // scale_in  # in latent pixels
    result = weights = None
    ramp = plan.overlap * scale_out
    for rows, cols, i, n_rows, j, n_cols in _tiles(height, width, plan):
        tile_in = inp[..., rows.start * scale_in: rows.stop * scale_in, cols.start * scale_in: cols.stop * scale_in]
        tile_out = run(tile_in)
        if result is None:
            shape = (*tile_out.shape[:-2], height * scale_out, width * scale_out)
            result = torch.zeros(shape, dtype=torch.float32, device=tile_out.device)
            weights = torch.zeros(shape[-2:], dtype=torch.float32, device=tile_out.device)
        h, w = tile_out.shape[-2:]
        weight = _blend_weight(h, w, ramp, i, n_rows, j, n_cols, tile_out.device)
        out_rows = slice(rows.start * scale_out, rows.start * scale_out + h)
        out_cols = slice(cols.start * scale_out, cols.start * scale_out + w)
        result[..., out_rows, out_cols] += tile_out.float() * weight
        weights[out_rows, out_cols] += weight
    return (result / weights).to(inp.dtype)


def _per_slice(run, inp: torch.Tensor, plan: VaePlan) -> torch.Tensor:
    if plan.slice_batch and inp.shape[0] > 1:
        return torch.cat([run(part) for part in inp.split(1)])
    return run(inp)


def vae_decode(vae, z: torch.Tensor, plan: VaePlan | None = None, budget_bytes: int | None = None) -> torch.Tensor:
    """Latents (B, C, f, h, w), already divided by the scaling factor, -> video (B, 3, F, H, W) in
    [-1, 1] (VAE dtype). `plan`: explicit; else chosen by `plan_vae` for `budget_bytes`."""
    spatial, temporal = _ratios(vae)
    if plan is None:
        frames = (z.shape[2] - 1) * temporal + 1
        plan = plan_vae(vae, z.shape[0], z.shape[-2] * spatial, z.shape[-1] * spatial, frames, z.dtype,
                        budget_bytes)

    def one(part: torch.Tensor) -> torch.Tensor:
        if not plan.tiled:
            return _decode_frames(vae, part)
        return _run_tiled(lambda tile: _decode_frames(vae, tile), part, plan, 1, spatial)

    return _per_slice(one, z, plan)


def vae_encode_moments(vae, x: torch.Tensor, plan: VaePlan | None = None,
                       budget_bytes: int | None = None) -> torch.Tensor:
    """Video (B, 3, F, H, W) in [-1, 1] -> moments (B, 2C, f, h, w) (mean, log-variance)."""
    spatial, _ = _ratios(vae)
    if plan is None:
        plan = plan_vae(vae, x.shape[0], x.shape[-2], x.shape[-1], x.shape[2], x.dtype, budget_bytes, encode=True)
    if x.shape[-2] % spatial or x.shape[-1] % spatial:
        raise ValueError(f"VAE input must be a multiple of {spatial} px; got {x.shape[-2]}x{x.shape[-1]}")

    def one(part: torch.Tensor) -> torch.Tensor:
        if not plan.tiled:
            return _encode_moments(vae, part)
        return _run_tiled(lambda tile: _encode_moments(vae, tile), part, plan, spatial, 1)

    return _per_slice(one, x, plan)


def vae_encode_mode(vae, x: torch.Tensor, plan: VaePlan | None = None, budget_bytes: int | None = None
                    ) -> torch.Tensor:
    """The posterior's mode (= mean), as `vae.encode(x)[0].mode()` returns it."""
    moments = vae_encode_moments(vae, x, plan, budget_bytes)
    return moments.chunk(2, dim=1)[0]


def tile_count(height: int, width: int, plan: VaePlan) -> int:
    """Number of tiles `plan` cuts a (latent) height x width into."""
    if not plan.tiled:
        return 1
    return len(_positions(height, plan.tile, plan.overlap)) * len(_positions(width, plan.tile, plan.overlap))


__all__ = ["VaePlan", "UNTILED", "vae_peak_bytes", "plan_vae", "device_budget_bytes", "vae_budget", "vae_decode",
           "vae_encode_moments", "vae_encode_mode", "tile_count"]
