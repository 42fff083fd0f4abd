"""Headless reward LoRA training.

    python -m easyanimate_reward.training --model FOLDER --reward KIND [--reward-folder DIR]
        --prompts FILE --output FILE.safetensors [--eval-prompts FILE] [--resume FILE] [settings]

KIND is a reward kind (hps_v2.1, pickscore, mps, aesthetic_v2, saturation, ...) or a weighted
combination such as "hps_v2.1 + 0.5*aesthetic_v2". Every TrainConfig field is a flag
(--sampling-steps, --backprop tail --backprop-k 10, --learning-rate, ...). Ctrl-C stops cleanly:
the LoRA so far is saved to --output (exit code 130).

Files written beside --output OUT.safetensors: OUT.safetensors.json (settings, step, history),
OUT.optimizer.safetensors (AdamW state + float32 weights: --resume OUT.safetensors continues exactly
as an uninterrupted run would) and, with --eval-prompts and --eval-every, OUT.best.safetensors (+ .json),
the LoRA of the best held-out reward so far.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from dataclasses import fields

import torch

from .config import BACKPROP_STRATEGIES, TrainConfig

log = logging.getLogger("easyanimate_reward.training")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m easyanimate_reward.training",
                                     description="Train an EasyAnimate LoRA by reward backpropagation.",
                                     epilog="Beside --output OUT.safetensors go OUT.safetensors.json (settings, "
                                            "history), OUT.optimizer.safetensors (optimizer state for an exact "
                                            "--resume) and, with held-out evaluation, OUT.best.safetensors (+ .json), "
                                            "the LoRA of the best held-out reward so far.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="EasyAnimate model folder (V5 or V5.1)")
    parser.add_argument("--reward", required=True, help="reward kind, or a combination like 'hps_v2.1 + 0.5*aesthetic_v2'")
    parser.add_argument("--reward-folder", default=None, help="reward_models folder (not needed for weight-free kinds)")
    parser.add_argument("--prompts", required=True, help=".txt (a prompt a line) or .jsonl (key 'prompt')")
    parser.add_argument("--eval-prompts", default=None, help="held-out prompts file")
    parser.add_argument("--output", required=True, help="LoRA file to write (.safetensors); its .json sidecar and .optimizer.safetensors go "
                             "beside it (and .best.safetensors with held-out evaluation)")
    parser.add_argument("--resume", default=None, help="continue from this LoRA file: step and history from its .json, AdamW state and float32 "
                             "weights from its .optimizer.safetensors (exact resume; without it the moments restart)")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--memory-mode", default="model_cpu_offload",
                        choices=["none", "model_cpu_offload", "model_cpu_offload_and_qfloat8"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reward-dtype", default=None, help="reward weight dtype (default: the model precision)")
    parser.add_argument("--save-dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the LoRA file")
    parser.add_argument("--reward-normalization", choices=["none", "scale", "zscore"], default="none",
                        help="normalise each term of a combined --reward first: by its kind's typical range (scale) "
                             "or by running statistics saved with the checkpoints (zscore)")
    parser.add_argument("--scoring", choices=["pack", "easyanimate"], default="pack",
                        help="easyanimate: score as EasyAnimate's reward trainer (PickScore/MPS plain cosine, squash)")
    defaults = TrainConfig()
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        default = getattr(defaults, f.name)
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default)
        elif f.name == "backprop":
            parser.add_argument(_flag(f.name), choices=BACKPROP_STRATEGIES, default=default)
        elif f.name == "eval_every":
            parser.add_argument(_flag(f.name), type=int, default=default,
                                help="score --eval-prompts every N steps (0: never); the best LoRA so far is kept "
                                     "as OUT.best.safetensors")
        elif f.name == "max_reward":
            parser.add_argument(_flag(f.name), type=float, default=None,
                                help="set: loss = |reward - max_reward| * loss_scale; unset: -reward * loss_scale")
        else:
            parser.add_argument(_flag(f.name), type=type(default), default=default)
    return parser


def load_reward_spec(spec: str, folder: str | None, device, dtype, normalization: str = "none",
                     scoring: str = "pack"):
    from ..reward.combine import normalized_combination
    from ..reward.registry import REWARD_KINDS, load_reward, parse_combination_terms, scoring_options

    def load(name):
        return load_reward(name, folder, device, dtype, **scoring_options(name, scoring))

    if spec in REWARD_KINDS and normalization == "none":
        return load(spec)
    terms = [(spec, 1.0)] if spec in REWARD_KINDS else parse_combination_terms(spec)
    loaded = {name: load(name) for name in dict.fromkeys(n for n, _ in terms)}
    return normalized_combination([(loaded[name], weight) for name, weight in terms], normalization).freeze()


def main(argv: list[str] | None = None) -> int:
    from ..easyanimate.loading import load_pipe
    from ..easyanimate.model import EasyAnimateModel
    from .prompts import read_prompt_file
    from .trainer import RewardLoRATrainer, TrainingDivergedError

    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)}).validate()
    prompts = read_prompt_file(args.prompts)
    eval_prompts = read_prompt_file(args.eval_prompts) if args.eval_prompts else []
    pipe = load_pipe(args.model, args.precision, args.memory_mode, device=args.device)
    reward = load_reward_spec(args.reward, args.reward_folder, args.device, args.reward_dtype or pipe.dtype,
                              args.reward_normalization, args.scoring)
    trainer = RewardLoRATrainer(
        EasyAnimateModel(pipe), reward, prompts, config, output_path=args.output, eval_prompts=eval_prompts,
        resume_from=args.resume, save_dtype=torch.float32 if args.save_dtype == "fp32" else torch.bfloat16,
        extra_info={"reward": args.reward, "model": args.model})
    try:
        result = trainer.train()
    except KeyboardInterrupt:
        print(f"interrupted at step {trainer.state.step}; LoRA kept in {trainer.saved_path}", file=sys.stderr)
        return 130
    except TrainingDivergedError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(f"{result.stop_reason} at step {result.state.step}; LoRA saved to {result.saved_path}")
    if result.best_path is not None:
        print(f"best held-out reward {result.best_eval_reward:.5g} at step {result.best_step}: {result.best_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
