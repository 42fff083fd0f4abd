"""Headless reward LoRA training.

    python -m easyanimate_reward.training --model FOLDER --reward KIND [--reward-folder DIR]
        --prompts FILE --lora-name FILE.safetensors [--eval-prompts FILE] [--resume FILE] [settings]

KIND is a reward kind (hps_v2.1, pickscore, mps, aesthetic_v2, saturation, ...) or a weighted
combination such as "hps_v2.1 + 0.5*aesthetic_v2". Every training setting is a flag named as the
node's input (--sampling-steps, --backprop tail --backprop-k 10, --learning-rate, ...), generated
from the one settings table (training/config.py; `--help` lists them by group). Ctrl-C stops
cleanly: the LoRA so far is saved to --lora-name (exit code 130; SIGTERM: 143).

Data-parallel on several GPUs (or CPU processes): launch the same command with
    accelerate launch --multi_gpu --num_processes N -m easyanimate_reward.training ...
or  torchrun --nproc_per_node N -m easyanimate_reward.training ...
(--batch-size is per process; only rank 0 writes files; see training/distributed.py).

Files: --lora-name OUT.safetensors (the LoRA) and, with --eval-prompts and --eval-every,
OUT.best.safetensors (the LoRA of the best held-out reward so far); everything else in the run
folder (--run-dir, default: see training/run_layout.py): run.json (settings, step, history, stop
reason), plot.png, training_state.safetensors (AdamW state + float32 weights: --resume OUT.safetensors
continues exactly as an uninterrupted run would). A run never replaces another run's files: when
OUT is taken (and --resume is not OUT itself), the run is saved as OUT_001.safetensors, ...
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from ..easyanimate.memory import TRAINING_MEMORY_MODES
from ..easyanimate.precision import PRECISIONS, SAVE_DTYPES
from .config import PromptSources, TrainConfig
from .settings import add_cli_arguments, cli_values


log = logging.getLogger("easyanimate_reward.training")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m easyanimate_reward.training",
                                     description="Train an EasyAnimate LoRA by reward backpropagation.",
                                     epilog="Beside --lora-name OUT.safetensors goes, with held-out evaluation, "
                                            "OUT.best.safetensors; run.json (settings, history), plot.png, "
                                            "training_state.safetensors (for an exact --resume), checkpoints/, "
                                            "logs/ (TensorBoard) and validation/ (MP4s) go to the run folder. A "
                                            "taken OUT becomes OUT_001, ... (never overwritten).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="EasyAnimate model folder (V5 or V5.1)")
    parser.add_argument("--reward", required=True, help="reward kind, or a combination like 'hps_v2.1 + 0.5*aesthetic_v2'")
    parser.add_argument("--reward-folder", default=None, help="reward_models folder (not needed for weight-free kinds)")
    parser.add_argument("--prompts", required=True, help=".txt (a prompt a line; 'image.png | prompt' starts from an "
                             "image) or .jsonl (keys 'prompt', optional 'image'); images are looked up beside the file")
    parser.add_argument("--lora-name", required=True, help="LoRA file to write (.safetensors; .best.safetensors goes "
                             "beside it with held-out evaluation); a taken name gets a counter suffix")
    parser.add_argument("--run-dir", default=None, help="run folder (run.json, training_state.safetensors, "
                             "checkpoints/ logs/ validation/); default: <ComfyUI>/output/easyanimate_reward_runs/<name> "
                             "when --lora-name is in a ComfyUI models/loras folder, else easyanimate_reward_runs/<name> "
                             "beside it")
    parser.add_argument("--resume", default=None, help="continue from this LoRA file: step, history, AdamW state and "
                             "float32 weights from its run folder (exact resume). --resume OUT with --lora-name OUT "
                             "writes on into the same run; another --lora-name starts a new run from it")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="bf16")
    parser.add_argument("--memory-mode", default="model_cpu_offload", choices=list(TRAINING_MEMORY_MODES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reward-dtype", default=None, help="reward weight dtype (default: the model precision)")
    parser.add_argument("--save-dtype", choices=list(SAVE_DTYPES), default="bf16", help="dtype of the LoRA file")
    parser.add_argument("--reward-normalization", choices=["none", "scale", "zscore"], default="none",
                        help="normalise each term of a combined --reward first: by its kind's typical range (scale) "
                             "or by running statistics saved with the checkpoints (zscore)")
    parser.add_argument("--scoring", choices=["pack", "easyanimate"], default="pack",
                        help="easyanimate: score as EasyAnimate's reward trainer (PickScore/MPS plain cosine, squash)")
    add_cli_arguments(parser, TrainConfig, PromptSources)  # every training setting, from the one table
    return parser


def load_reward_spec(spec: str, folder: str | None, device, dtype, normalization: str = "none",
                     scoring: str = "pack"):
    from ..reward.registry import load_reward_expression

    return load_reward_expression(spec, folder, device, dtype, normalization, scoring)


def main(argv: list[str] | None = None) -> int:
    from .distributed import DataParallel, install_stop_signals

    args = build_parser().parse_args(argv)
    config_values, source_values = cli_values(args, TrainConfig, PromptSources)
    config, sources = TrainConfig(**config_values).validate(), PromptSources(**source_values)
    # Under torchrun / accelerate launch: this process is one rank (refuses FSDP / ZeRO-3 here, before loading).
    dist = DataParallel.from_environment(args.device)
    device = dist.device if dist.active else args.device
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING,
                            format=f"%(asctime)s %(levelname)s{f' [rank {dist.rank}]' if dist.active else ''} %(message)s")
    restore_signals = install_stop_signals()  # SIGTERM stops as cleanly as Ctrl-C; neither cuts a step or a save
    try:
        return _train(args, config, sources, dist, device)
    finally:
        restore_signals()
        dist.close()


def _train(args, config: TrainConfig, sources: PromptSources, dist, device) -> int:
    from ..easyanimate.loading import load_pipe
    from ..easyanimate.model import EasyAnimateModel
    from .distributed import Terminated
    from .prompts import read_prompt_file, read_prompt_items
    from .trainer import RewardLoRATrainer, TrainingDivergedError

    prompts = read_prompt_items(args.prompts)
    eval_prompts = read_prompt_file(sources.eval_prompts) if sources.eval_prompts else []
    validation_prompts = read_prompt_file(sources.validation_prompts) if sources.validation_prompts else []
    pipe = load_pipe(args.model, args.precision, args.memory_mode, device=device)
    reward = load_reward_spec(args.reward, args.reward_folder, device, args.reward_dtype or pipe.dtype,
                              args.reward_normalization, args.scoring)
    trainer = RewardLoRATrainer(
        EasyAnimateModel(pipe), reward, prompts, config, output_path=args.lora_name, run_dir=args.run_dir,
        eval_prompts=eval_prompts, validation_prompts=validation_prompts, resume_from=args.resume,
        save_dtype=SAVE_DTYPES[args.save_dtype],
        extra_info={"reward": args.reward, "model": args.model, "world_size": dist.world_size,
                    "global_batch": config.batch_size * dist.world_size * config.grad_accumulation},
        distributed=dist)
    where = f"rank {dist.rank}: " if dist.active else ""
    try:
        result = trainer.train()
    except KeyboardInterrupt as e:
        kept = trainer.saved_path if dist.is_main else "rank 0's output"
        print(f"{where}{'terminated' if isinstance(e, Terminated) else 'interrupted'} at step {trainer.state.step}; "
              f"LoRA kept in {kept}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except TrainingDivergedError as e:
        print(f"{where}{e}", file=sys.stderr)
        return 1
    except Exception as e:
        if not dist.active:
            raise
        # Typically another rank died and this rank's collective failed: stop, rank 0 kept the last step.
        kept = trainer.saved_path if dist.is_main else "rank 0's output"
        print(f"{where}stopped at step {trainer.state.step} ({type(e).__name__}: {e}); LoRA kept in {kept}",
              file=sys.stderr)
        return 1
    if not dist.is_main:
        return 0
    print(f"{result.stop_reason} at step {result.state.step}; LoRA saved to {result.saved_path}; "
          f"run folder {result.layout.folder}")
    if result.best_path is not None:
        print(f"best held-out reward {result.best_eval_reward:.5g} at step {result.best_step}: {result.best_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
