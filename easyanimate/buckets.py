"""Aspect-ratio buckets: the trained sizes EasyAnimate picks for an input's aspect ratio.

Facts from the official code (easyanimate/data/bucket_sampler.py ASPECT_RATIO_512 and
get_closest_ratio; comfyui_nodes.py I2V/V2V samplers): the sizes at base resolution 512 are the
(height, width) pairs below, keyed by their height/width ratio rounded to two decimals; the key
closest to the input's height/width wins (the first on a tie, in ascending order); the pair is
scaled by base_resolution / 512 and each side floored to a multiple of 16. Which input decides: the
reference image, else the control video, else the video-to-video input, else the start (or end)
image; with none of them, the requested width x height.
"""

from __future__ import annotations

from dataclasses import replace

BASE_RESOLUTIONS = (512, 768, 960, 1024)

# (height, width) at 512, in ascending height/width.
_SIZES_512 = (
    (256, 1024), (256, 992), (256, 960), (256, 928), (288, 896), (288, 864), (288, 832), (320, 800),
    (320, 768), (352, 736), (352, 704), (352, 672), (384, 672), (384, 640), (416, 608), (416, 576),
    (448, 576), (448, 544), (480, 544), (480, 512), (512, 512), (512, 480), (544, 480), (544, 448),
    (576, 448), (576, 416), (608, 416), (640, 384), (672, 384), (704, 352), (736, 352), (768, 320),
    (800, 320), (832, 288), (864, 288), (896, 288), (928, 256), (960, 256), (992, 256), (1024, 256),
)
BUCKETS_512 = {round(h / w, 2): (h, w) for h, w in _SIZES_512}


def closest_size(height: float, width: float, base_resolution: int) -> tuple[int, int]:
    """(height, width) of the trained bucket closest to height/width at `base_resolution`."""
    if base_resolution not in BASE_RESOLUTIONS:
        raise ValueError(f"base_resolution must be one of {', '.join(map(str, BASE_RESOLUTIONS))}, "
                         f"got {base_resolution}")
    if height <= 0 or width <= 0:
        raise ValueError(f"cannot pick a bucket for a {width}x{height} input")
    aspect = height / width
    key = min(BUCKETS_512, key=lambda k: abs(k - aspect))
    h, w = BUCKETS_512[key]
    scale = base_resolution / 512
    return int(h * scale / 16) * 16, int(w * scale / 16) * 16


def _size_source(request) -> tuple[int, int] | None:
    """(height, width) of the input that decides the bucket."""
    for name in ("ref_image", "control_video", "video", "start_image", "end_image"):
        value = getattr(request, name, None)
        if value is not None:
            return int(value.shape[-2]), int(value.shape[-1])
    return None


def resolve_size(request):
    """The request with width/height set from its bucket when base_resolution is set."""
    if not getattr(request, "base_resolution", None):
        return request
    height, width = _size_source(request) or (request.height, request.width)
    height, width = closest_size(height, width, int(request.base_resolution))
    return replace(request, width=width, height=height, base_resolution=None)
