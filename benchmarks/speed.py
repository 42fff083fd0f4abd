"""Inference speed-ups (TeaCache, cfg-skip) and flow samplers on the tiny model, side by side.

Part 1, speed-ups vs off (same prompts, same seeds): transformer block-stack passes and batch rows
(counted by a hook on the first block, so what the code really ran), the share of transformer work
saved, the wall-time ratio vs off (median of interleaved repeats, with the spread) and the reward
difference on the same seeds (weight-free rewards; the tiny model is random, so this shows how far
the speed-ups move the result, not a quality verdict).

Part 2, flow samplers at few steps: the latent error against a 200-step Flow Euler reference of the
same seed, for Flow (Euler), Flow UniPC and Flow DPM++ at 10/20/30 steps.

    .venv/bin/python benchmarks/speed.py              # ~2-4 min on 2 CPU cores
    .venv/bin/python benchmarks/speed.py --quick      # fewer repeats
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from tables import markdown_table  # benchmarks/tables.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / ".cache" / "pkgroot"))

CONFIGS = {
    "off": {},
    "teacache 0.05": {"teacache": True, "teacache_threshold": 0.05},
    "teacache 0.10": {"teacache": True, "teacache_threshold": 0.10},
    "teacache 0.20": {"teacache": True, "teacache_threshold": 0.20},
    "cfg-skip 0.25": {"cfg_skip_ratio": 0.25},
    "teacache 0.10 + cfg-skip 0.25": {"teacache": True, "teacache_threshold": 0.10, "cfg_skip_ratio": 0.25},
}
PROMPTS = ["a red fox running through snow", "a city street at night in the rain"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", choices=["v5", "v5.1"], default="v5.1")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=128, help="width = height in pixels")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.seeds, args.size, args.frames = 2, 1, 64, 5
    return args


def run_configurations(pipe, args, jobs) -> tuple[dict, dict, dict]:
    """Every configuration on every job, `args.repeats` times interleaved -> ({name: wall times},
    {name: (block-stack passes, batch rows)}, {name: {reward: per-video mean scores}}) (counts and
    scores from the first repeat)."""
    from easyanimate_reward.easyanimate.model import EasyAnimateModel
    from easyanimate_reward.easyanimate.sampling import SampleRequest, sample_video
    from easyanimate_reward.reward.registry import load_reward

    model = EasyAnimateModel(pipe)
    rows: list[int] = []
    pipe.transformer.transformer_blocks[0].register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    rewards = {k: load_reward(k) for k in ("colorfulness", "sharpness")}

    def request(prompt, seed, **extra):
        return SampleRequest(prompt, width=args.size, height=args.size, frames=args.frames, steps=args.steps,
                             guidance_scale=6.0, seed=seed, **extra)

    times = {name: [] for name in CONFIGS}
    counted, scores = {}, {}
    for repeat in range(args.repeats):
        for name, extra in CONFIGS.items():  # interleaved: each repeat runs every configuration once
            rows.clear()
            start = time.perf_counter()
            videos = [sample_video(model, request(p, s, **extra)) for p, s in jobs]
            times[name].append(time.perf_counter() - start)
            if repeat == 0:
                counted[name] = (len(rows), sum(rows))
                with torch.no_grad():
                    scores[name] = {k: torch.stack([r(v.permute(0, 3, 1, 2), [p] * v.shape[0]).mean()
                                                    for v, (p, _) in zip(videos, jobs)]) for k, r in rewards.items()}
    return times, counted, scores


def print_speedups(args, jobs, times, counted, scores) -> None:
    print(f"## speed-ups vs off: tiny {args.version}, {args.size}x{args.size}x{args.frames}, {args.steps} steps, "
          f"cfg 6, {len(jobs)} videos (same seeds), {args.repeats} interleaved repeats\n")
    off_rows = counted["off"][1]
    off_time = statistics.median(times["off"])
    table = []
    for name in CONFIGS:
        passes, total_rows = counted[name]
        ratios = [t / off_time for t in times[name]]
        diffs = [float((scores[name][k] - scores["off"][k]).abs().mean()) for k in scores["off"]]
        table.append((name, passes, total_rows, f"{1 - total_rows / off_rows:.0%}",
                      f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})",
                      f"{diffs[0]:.4f}", f"{diffs[1]:.4f}"))
    print(markdown_table(("configuration", "block-stack passes", "batch rows", "transformer work saved",
                          "wall time vs off (median, min-max)", "colorfulness diff (mean abs)",
                          "sharpness diff (mean abs)"), table))
    off_scores = {k: float(v.mean()) for k, v in scores["off"].items()}
    print(f"\n(mean reward with everything off: colorfulness {off_scores['colorfulness']:.4f}, "
          f"sharpness {off_scores['sharpness']:.4f})\n")


def print_flow_samplers(pipe) -> None:
    """Latent error of the flow samplers at 10/20/30 steps vs a 200-step Flow Euler reference."""
    from easyanimate_reward.easyanimate.sampling import (
        denoise, encode_request_prompts, initial_noise, inpaint_condition, latent_shape, make_scheduler, set_timesteps)

    shape = latent_shape(1, 64, 64, 5)
    cond, uncond = encode_request_prompts(pipe, PROMPTS[0], "", 6.0)
    inpaint = inpaint_condition(pipe, shape, 5, None, [0])

    def final_latents(name, steps, seed):
        scheduler = make_scheduler(pipe, name)
        timesteps = set_timesteps(scheduler, steps, "cpu")
        noise = initial_noise(shape, [seed], "cpu", torch.float32)
        with torch.no_grad():
            return denoise(pipe.transformer, scheduler, timesteps, noise, cond, inpaint, 6.0, uncond)

    seeds = range(2)
    reference = {s: final_latents("Flow", 200, s) for s in seeds}
    print("## flow samplers: latent error vs a 200-step Flow Euler reference (tiny v5.1, 64x64x5, cfg 6, "
          f"{len(seeds)} seeds, mean abs; lower is closer to the converged ODE solution)\n")
    samplers = ("Flow", "Flow UniPC", "Flow DPM++")
    print(markdown_table(("steps", "Flow (Euler)", "Flow UniPC", "Flow DPM++"), (
        (steps, *(f"{statistics.mean(float((final_latents(name, steps, s) - reference[s]).abs().mean()) for s in seeds):.4f}"
                  for name in samplers)) for steps in (10, 20, 30))))


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from easyanimate_reward.easyanimate.loading import load_pipe
    from easyanimate_reward.easyanimate.tiny import cached_tiny_models

    pipe = load_pipe(cached_tiny_models(REPO / ".cache" / "tiny-models")[args.version], "fp32", "none")
    jobs = [(p, s) for p in PROMPTS for s in range(args.seeds)]
    print_speedups(args, jobs, *run_configurations(pipe, args, jobs))
    if args.version == "v5.1":
        print_flow_samplers(pipe)


if __name__ == "__main__":
    main()
