"""Frames per second scoring a batch of video frames: our batched torch path vs the usual per-image
PIL + CLIPImageProcessor loop, on the same randomly initialised open_clip model (no download).

    .venv/bin/python -m easyanimate_reward.benchmarks.reward_throughput            # ViT-H-14, CPU
    .venv/bin/python benchmarks/reward_throughput.py --model ViT-B-16 --batch 8

Ours: frames (B, 3, H, W) float in [0, 1] (what a VAE decode gives) -> HPSReward (torch bicubic
antialiased resize + normalise on the whole batch, one image forward, text encoded with the batch).
Baselines, as reference scorers do it (HPSv2's `score`, PickScore's README): per frame, tensor ->
uint8 PIL image -> CLIPImageProcessor -> model.encode_image(1 image) -> cosine with the prompt's
embedding, the prompt encoded once per frame ("per-image") or, as a careful user would, once for
all frames ("per-image, prompt once": the fair baseline). All use "crop" preprocessing (shortest
side 224 + centre crop) so the work is the same.

The paths are timed interleaved (each repeat runs every path once, in rotating order), so a
machine that gets busier or quieter affects all of them alike; the report gives the median and
the spread (min..max) of each path and the ratio of the medians.
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


def per_image_baseline(model, tokenizer, processor, frames: torch.Tensor, prompt: str,
                       prompt_once: bool = False) -> torch.Tensor:
    from PIL import Image

    device = next(model.parameters()).device
    scores = []
    text = model.encode_text(tokenizer([prompt]).to(device), normalize=True) if prompt_once else None
    for frame in frames:
        array = (frame.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
        pixels = processor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"].to(device)
        image = model.encode_image(pixels, normalize=True)
        if not prompt_once:
            text = model.encode_text(tokenizer([prompt]).to(device), normalize=True)
        scores.append((image * text).sum(-1))
    return torch.cat(scores)


def interleaved_times(functions: dict, repeats: int) -> dict[str, list[float]]:
    """Each repeat times every function once, in an order rotated per repeat."""
    # (the caller's first scoring calls already warmed up allocator and thread pools)
    names, times = list(functions), {name: [] for name in functions}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-H-14", help="open_clip architecture (random init)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=672)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed runs per path (median reported)")
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
        # First calls: warm-up, and the paths' scores for the agreement check.
        ours_scores = reward(frames, [prompt])
        base_scores = per_image_baseline(model, tokenizer, processor, frames, prompt)
        once_scores = per_image_baseline(model, tokenizer, processor, frames, prompt, prompt_once=True)
        times = interleaved_times({
            "ours (batched torch)": lambda: reward(frames, [prompt]),
            "per-image, prompt per frame": lambda: per_image_baseline(model, tokenizer, processor, frames, prompt),
            "per-image, prompt once": lambda: per_image_baseline(model, tokenizer, processor, frames, prompt, True),
        }, args.repeats)
        prep_ours = median(interleaved_times({"prep": lambda: reward.pixel_values(frames)}, args.repeats)["prep"])

    ours = median(times["ours (batched torch)"])
    result = {
        "model": args.model, "device": args.device, "batch": args.batch, "frame": f"{args.height}x{args.width}",
        "repeats": args.repeats,
        "fps_median": {name: args.batch / median(t) for name, t in times.items()},
        "speedup_vs_per_image": median(times["per-image, prompt per frame"]) / ours,
        "speedup_vs_prompt_once": median(times["per-image, prompt once"]) / ours,
        "ours_preprocess_ms_per_frame": 1000 * prep_ours / args.batch,
        "max_score_difference": float(max((ours_scores - base_scores).abs().max(), (ours_scores - once_scores).abs().max())),
    }
    print(f"{args.model} {args.device}, batch {args.batch} frames of {args.height}x{args.width}, "
          f"{args.repeats} interleaved repeats:")
    for name, t in times.items():
        print(f"  {name:<30} median {median(t):7.3f} s ({args.batch / median(t):7.3f} frames/s), "
              f"spread {min(t):.3f}..{max(t):.3f} s")
    print(f"  speed-up vs per-image (prompt per frame): {result['speedup_vs_per_image']:.2f}x (ratio of medians)")
    print(f"  speed-up vs per-image (prompt once):      {result['speedup_vs_prompt_once']:.2f}x (ratio of medians)")
    print(f"  our preprocessing:             {result['ours_preprocess_ms_per_frame']:.1f} ms/frame")
    print(f"  max |score difference|:        {result['max_score_difference']:.2e} (uint8 + PIL vs float torch resize)")
    return result


if __name__ == "__main__":
    main()
