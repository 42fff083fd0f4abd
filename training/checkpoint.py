"""LoRA checkpoints of a reward-training run.

A checkpoint is the LoRA itself, in the official EasyAnimate (kohya) format that every LoRA
loader of the pack and of EasyAnimate reads, plus a JSON sidecar with the same name + ".json"
(training settings, step, reward history, why the run stopped). Both are written atomically
(temporary file in the same folder + os.replace). The step is also stored in the safetensors
metadata, so a sidecar from an older save is recognised.

Weights that are not finite are never written: the previous (good) file stays as it was.
Optimizer state is not saved: a resumed run restarts AdamW's moment estimates (the LoRA file
stays a plain, shareable LoRA).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..easyanimate.lora_format import LoraWeights, load_lora_file, save_lora_file
from ..fileio import write_text_atomic

SIDECAR_FORMAT = "easyanimate_reward.training/1"
STEP_KEY = "easyanimate_reward_step"
CONFIG_KEY = "easyanimate_reward_config"


class NonFiniteWeightsError(ValueError):
    """Refused to write LoRA weights holding NaN or inf."""


def new_history() -> dict[str, list]:
    return {"step": [], "reward": [], "loss": [], "grad_norm": [], "eval_step": [], "eval_reward": [], "eval_loss": []}


@dataclass
class TrainingState:
    """What a resumed run continues from."""

    step: int = 0
    history: dict[str, list] = field(default_factory=new_history)
    config: dict = field(default_factory=dict)
    stop_reason: str = ""
    best_eval: float | None = None
    evals_without_improvement: int = 0


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".json")


def weights_are_finite(weights: LoraWeights) -> bool:
    return all(bool(torch.isfinite(m.down).all() and torch.isfinite(m.up).all()) for m in weights.modules.values())


def _json_safe(value):
    """NaN/inf are not JSON: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def save_checkpoint(path: str | os.PathLike, weights: LoraWeights, state: TrainingState,
                    extra: dict | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the LoRA (official format) and its sidecar. Raises NonFiniteWeightsError, leaving any
    previous checkpoint untouched, when a weight is NaN or inf."""
    path = Path(path)
    if not weights_are_finite(weights):
        raise NonFiniteWeightsError(f"LoRA weights at step {state.step} hold NaN/inf; {path} was not overwritten")
    metadata = {STEP_KEY: str(state.step), CONFIG_KEY: json.dumps(_json_safe(state.config), sort_keys=True)}
    save_lora_file(path, weights, dtype=dtype, metadata=metadata)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "lora_file": path.name,
        "step": state.step,
        "stop_reason": state.stop_reason,
        "best_eval": state.best_eval,
        "evals_without_improvement": state.evals_without_improvement,
        "config": state.config,
        "history": state.history,
        "optimizer_state": "not saved (AdamW moments restart on resume)",
    }
    sidecar.update(extra or {})
    write_text_atomic(sidecar_path(path), json.dumps(_json_safe(sidecar), indent=1, sort_keys=True))
    return path


def _restore_nan(values: list) -> list:
    return [float("nan") if v is None else v for v in values]


def read_sidecar(path: str | os.PathLike) -> dict | None:
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        return json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{side} is not valid JSON: {e}") from e


def load_checkpoint(path: str | os.PathLike, transformer) -> tuple[LoraWeights, TrainingState]:
    """The LoRA (checked against `transformer`) and the training state to resume from. A LoRA
    without a sidecar (any kohya/PEFT LoRA) resumes at step 0 with an empty history."""
    path = Path(path)
    weights = load_lora_file(path, transformer)
    file_step = weights.metadata.get(STEP_KEY)
    sidecar = read_sidecar(path)
    state = TrainingState()
    if sidecar is not None:
        state.step = int(sidecar.get("step", 0))
        history = new_history()
        for key, values in (sidecar.get("history") or {}).items():
            if key in history:
                history[key] = _restore_nan(list(values))
        state.history = history
        state.config = dict(sidecar.get("config") or {})
        state.best_eval = sidecar.get("best_eval")
        state.evals_without_improvement = int(sidecar.get("evals_without_improvement") or 0)
    if file_step is not None and int(file_step) != state.step:
        # The sidecar belongs to another save (a crash between the two writes): trust the LoRA file.
        state.step = int(file_step)
        keep = [i for i, s in enumerate(state.history["step"]) if s <= state.step]
        for key in ("step", "reward", "loss", "grad_norm"):
            state.history[key] = [state.history[key][i] for i in keep if i < len(state.history[key])]
        evals = [i for i, s in enumerate(state.history["eval_step"]) if s <= state.step]
        for key in ("eval_step", "eval_reward", "eval_loss"):
            state.history[key] = [state.history[key][i] for i in evals if i < len(state.history[key])]
    return weights, state
