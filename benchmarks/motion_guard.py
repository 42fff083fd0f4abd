"""The motion guard's trade-off, measured on the tiny model (a report, not a pass/fail test).

Trains the same LoRA twice on an image-only reward (colourfulness: it cannot see motion) for the
same steps, seeds and prompts: once plain, once with `preserve motion` (the distance of each
video's motion to the base model's rollout on the same noise is penalised). Reports, for both,
the held-out reward gain and the held-out motion change against the base model's videos on the
same seeds (the trainer's own held-out records).

    .venv/bin/python benchmarks/motion_guard.py [--steps 30] [--lr 0.01] [--preserve-weight 1000 10000]

Tiny random models move little and not like real videos: the figures show what the guard does
to the optimisation, not what it does to EasyAnimate's motion.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".cache", "pkgroot"))

import torch  # noqa: E402
from tables import markdown_table  # noqa: E402 (benchmarks/tables.py)

from easyanimate_reward.easyanimate.loading import load_pipe  # noqa: E402
from easyanimate_reward.easyanimate.model import EasyAnimateModel  # noqa: E402
from easyanimate_reward.easyanimate.tiny import cached_tiny_models  # noqa: E402
from easyanimate_reward.reward.registry import load_reward  # noqa: E402
from easyanimate_reward.training.config import TrainConfig  # noqa: E402
from easyanimate_reward.training.trainer import RewardLoRATrainer  # noqa: E402

PROMPTS = ["a red ball rolling on grass", "a dog running on a beach", "clouds over mountains",
           "a car driving at night"]
HELD_OUT = ["a boat on a lake", "a bird flying over a city", "a person walking in the rain",
            "leaves falling in autumn"]


def image_reward(args):
    from easyanimate_reward.reward.combine import normalized_combination

    colour = load_reward("colorfulness")
    return normalized_combination([(colour, 1.0)], "scale") if args.normalize else colour


def run(pipe, preserve: str, weight: float, args, reward=None) -> dict:
    config = TrainConfig(width=64, height=64, frames=9, sampling_steps=4, cfg=1.0, rank=4, alpha=4.0,
                         learning_rate=args.lr, weight_decay=0.0, max_grad_norm=1.0, batch_size=2,
                         train_steps=args.steps, save_every=0, eval_every=args.steps, seed=0, backprop="tail",
                         backprop_k=2, num_decoded_latents=2, num_sampled_frames=1, gradient_checkpointing=False,
                         preserve=preserve, preserve_weight=weight)
    started = time.perf_counter()
    result = RewardLoRATrainer(EasyAnimateModel(pipe), reward or image_reward(args), PROMPTS, config,
                               eval_prompts=HELD_OUT).train()
    history = result.state.history
    return {"seconds": time.perf_counter() - started,
            "train_first": history["reward"][0], "train_last": history["reward"][-1],
            "eval_first": history["eval_reward"][0], "eval_last": history["eval_reward"][-1],
            "motion_base": history["eval_motion"][0], "motion_last": history["eval_motion"][-1],
            "motion_change": history["eval_motion_change"][-1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--preserve-weight", type=float, nargs="+", default=[1000.0])
    parser.add_argument("--normalize", action="store_true",
                        help="scale-normalise colourfulness to its typical range (0..1) first")
    parser.add_argument("--motion-term", type=float, nargs="*", default=[],
                        help="also train 'colourfulness + W x motion' (both scale-normalised) for each W")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    folder = cached_tiny_models(os.path.join(os.path.dirname(__file__), "..", ".cache", "tiny-models"))["v5"]
    pipe = load_pipe(folder, "fp32", "none")
    from easyanimate_reward.reward.combine import normalized_combination

    label = "colorfulness (scale-normalised)" if args.normalize else "colorfulness"
    rows = {f"{label} only": run(pipe, "none", 0.0, args)}
    for weight in args.preserve_weight:
        rows[f"{label} + preserve motion (weight {weight:g})"] = run(pipe, "motion", weight, args)
    for weight in args.motion_term:
        mixed = normalized_combination([(load_reward("colorfulness"), 1.0), (load_reward("motion"), weight)], "scale")
        rows[f"colorfulness + {weight:g} x motion (scale-normalised)"] = run(pipe, "none", 0.0, args, mixed)
    print(f"tiny V5, 64x64x9, 4 sampling steps, {args.steps} steps of batch 2, lr {args.lr:g}; held-out: "
          f"{len(HELD_OUT)} prompts on fixed seeds")
    print(markdown_table(
        ("run", "held-out reward gain", "held-out motion change vs base", "training reward first -> last", "time"),
        ((name, f"{r['eval_last'] - r['eval_first']:+.3f} ({r['eval_first']:.3f} -> {r['eval_last']:.3f})",
          f"{r['motion_change']:+.1f}% ({r['motion_base']:.3f} -> {r['motion_last']:.3f} px/frame)",
          f"{r['train_first']:.3f} -> {r['train_last']:.3f}", f"{r['seconds']:.0f} s") for name, r in rows.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
