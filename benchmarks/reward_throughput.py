"""Frames per second scoring a batch of video frames: our batched torch path vs the usual per-image
PIL + CLIPImageProcessor loop, on the same randomly initialised open_clip model (no download).

    .venv/bin/python -m easyanimate_reward.benchmarks.reward_throughput            # ViT-H-14, CPU
    .venv/bin/python benchmarks/reward_throughput.py --model ViT-B-16 --batch 8

Ours: frames (B, 3, H, W) float in [0, 1] (what a VAE decode gives) -> HPSReward (torch bicubic
antialiased resize + normalise on the whole batch, one image forward, text encoded with the batch).
Baseline, as reference scorers do it (HPSv2's `score`, PickScore's README): per frame, tensor -> uint8
PIL image -> CLIPImageProcessor -> model.encode_image(1 image) + encode_text(prompt) -> cosine.
Both use "crop" preprocessing (shortest side 224 + centre crop) so the work is the same.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    # Run as a script: make the pack importable as easyanimate_reward (repo root = the package).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / ".cache" / "pkgroot"))

from easyanimate_reward.reward.clip_text import open_clip_tokenizer  # noqa: E402
from easyanimate_reward.reward.hps import HPSReward, build_open_clip_model  # noqa: E402
from easyanimate_reward.reward.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402


def per_image_baseline(model, tokenizer, processor, frames: torch.Tensor, prompt: str) -> torch.Tensor:
    from PIL import Image

    device = next(model.parameters()).device
    scores = []
    for frame in frames:
        array = (frame.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
        pixels = processor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"].to(device)
        image = model.encode_image(pixels, normalize=True)
        text = model.encode_text(tokenizer([prompt]).to(device), normalize=True)
        scores.append((image * text).sum(-1))
    return torch.cat(scores)


def best_time(function, repeats: int) -> float:
    # (the caller's first scoring calls already warmed up allocator and thread pools)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-H-14", help="open_clip architecture (random init)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=672)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per path (best is kept)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from transformers import CLIPImageProcessor

    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_open_clip_model(args.model, args.device).eval()
    print(f"built random {args.model} on {args.device} in {time.perf_counter() - start:.1f} s, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters, {torch.get_num_threads()} threads")
    tokenizer = open_clip_tokenizer()
    reward = HPSReward(model, tokenizer, preprocess_mode="crop", name=f"random-{args.model}")
    processor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
    )
    frames = torch.rand(args.batch, 3, args.height, args.width, generator=torch.Generator().manual_seed(1)).to(args.device)
    prompt = "a corgi running on a beach at sunset"

    with torch.no_grad():
        # First calls: warm-up, and the two paths' scores for the agreement check.
        ours_scores = reward(frames, [prompt])
        base_scores = per_image_baseline(model, tokenizer, processor, frames, prompt)
        ours_s = best_time(lambda: reward(frames, [prompt]), args.repeats)
        base_s = best_time(lambda: per_image_baseline(model, tokenizer, processor, frames, prompt), args.repeats)
        prep_ours = best_time(lambda: reward.pixel_values(frames), args.repeats)

    result = {
        "model": args.model, "device": args.device, "batch": args.batch, "frame": f"{args.height}x{args.width}",
        "ours_fps": args.batch / ours_s, "baseline_fps": args.batch / base_s, "speedup": base_s / ours_s,
        "ours_preprocess_ms_per_frame": 1000 * prep_ours / args.batch,
        "max_score_difference": float((ours_scores - base_scores).abs().max()),
    }
    print(f"{args.model} {args.device}, batch {args.batch} frames of {args.height}x{args.width}:")
    print(f"  ours (batched torch):          {result['ours_fps']:.3f} frames/s")
    print(f"  baseline (PIL + processor):    {result['baseline_fps']:.3f} frames/s")
    print(f"  speed-up:                      {result['speedup']:.2f}x")
    print(f"  our preprocessing:             {result['ours_preprocess_ms_per_frame']:.1f} ms/frame")
    print(f"  max |score difference|:        {result['max_score_difference']:.2e} (uint8 + PIL vs float torch resize)")
    return result


if __name__ == "__main__":
    main()
