"""Measured typical ranges of the weight-free rewards (the values in reward/ranges.py).

Image kinds: the 10th and 90th percentile of each reward over the example images that ComfyUI's
workflow-template packages install with the host (real generated images and video stills,
centre-cropped and resized to 256x256). Time-aware kinds: synthetic videos with known motion
(reward/synthetic.py: pans of 0-4 px per frame, a 30% flicker), 64x64, 5 frames.

    .venv/bin/python benchmarks/reward_ranges.py [--limit N]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".cache", "pkgroot"))

from easyanimate_reward.reward.registry import load_reward  # noqa: E402
from easyanimate_reward.reward.synthetic import flicker_video, pan_video  # noqa: E402

IMAGE_KINDS = ("colorfulness", "saturation", "contrast", "sharpness", "compressibility")


def template_images(limit: int) -> list[str]:
    import site

    paths = []
    for root in site.getsitepackages():
        paths += glob.glob(os.path.join(root, "comfyui_workflow_templates*", "**", "*.webp"), recursive=True)
        paths += glob.glob(os.path.join(root, "comfyui_workflow_templates*", "**", "*.jpg"), recursive=True)
    return sorted(paths)[:limit]


def load_image(path: str, size: int = 256) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        rgb = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
        width, height = image.size
    frame = rgb.view(height, width, 3).permute(2, 0, 1).float().div(255).unsqueeze(0)
    short = min(height, width)
    top, left = (height - short) // 2, (width - short) // 2
    frame = frame[..., top:top + short, left:left + short]
    return F.interpolate(frame, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=400)
    args = parser.parse_args()
    paths = template_images(args.limit)
    if not paths:
        print("no template images found (install the host's requirements)", file=sys.stderr)
        return 1
    frames = torch.cat([load_image(p) for p in paths])
    print(f"image kinds over {len(paths)} template images (256x256): p10 / median / p90")
    with torch.no_grad():
        for kind in IMAGE_KINDS:
            reward = load_reward(kind)
            scores = torch.cat([reward(chunk) for chunk in frames.split(16)])
            p10, p50, p90 = torch.quantile(scores, torch.tensor([0.1, 0.5, 0.9])).tolist()
            print(f"  {kind:16s} {p10:10.4g} {p50:10.4g} {p90:10.4g}")
            if kind == "sharpness":
                noise = reward(torch.rand(8, 3, 256, 256, generator=torch.Generator().manual_seed(0))).mean()
                print(f"  {'(pure noise)':16s} {float(noise):10.4g}")
        print("time-aware kinds on synthetic 64x64 videos, 5 frames:")
        videos = {"static": pan_video(0.0), "pan 1 px": pan_video(1.0), "pan 2 px": pan_video(2.0),
                  "pan 4 px": pan_video(4.0), "flicker 30%": flicker_video(0.3)}
        for kind in ("motion", "temporal_consistency", "frame_difference"):
            reward = load_reward(kind)
            row = "  ".join(f"{name} {float(reward(video).mean()):.4g}" for name, video in videos.items())
            print(f"  {kind:20s} {row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
