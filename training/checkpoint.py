"""Files of a reward-training run (see run_layout.py for where they live and who owns them).

- The LoRA (`<run>.safetensors`, and `<run>.best.safetensors`) in the official EasyAnimate (kohya)
  format that every LoRA loader reads; its metadata holds the step, the settings and the run id.
- `run.json` in the run folder: settings, step, reward history, why the run stopped, the best
  held-out evaluation, the files the run created.
- `training_state.safetensors` in the run folder: what an exact resume needs and a shareable LoRA
  should not carry: per LoRA factor (key = diffusers module path + ".down"/".up") AdamW's state
  (`exp_avg`, `exp_avg_sq`, `step`) and the float32 master weight (`master`; the LoRA file is
  usually bf16, and resuming from rounded weights would drift from an uninterrupted run), plus the
  fp16 GradScaler's state (`grad_scaler.*`). No RNG state is stored because the trainer uses no
  global RNG: rollout seeds, prompt order and the drawn backprop steps all derive from (seed, step
  index). A resume without that file (or with one from another save) warns and restarts AdamW.

Every write is atomic (fileio). Weights that are not finite are never written: the previous
(good) file stays as it was.
"""

from __future__ import annotations

import json
import math
import os
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ..easyanimate.lora_format import LoraWeights, load_lora_file, save_lora_file
from ..fileio import save_safetensors_atomic, write_text_atomic
from .run_layout import LORA_SUFFIX, RUN_FORMAT, RUN_ID_KEY, RunLayout, file_run_id, read_run_record

log = logging.getLogger(__name__)

STATE_FORMAT = "easyanimate_reward.training.state/2"
STEP_KEY = "easyanimate_reward_step"
CONFIG_KEY = "easyanimate_reward_config"
MASTER_KEY = "master"  # per-factor suffix of the float32 master weight in the state file
SCALER_PREFIX = "grad_scaler."  # GradScaler state (fp16 training) in the state file


class NonFiniteWeightsError(ValueError):
    """Refused to write LoRA weights holding NaN or inf."""


def new_history() -> dict[str, list]:
    return {"step": [], "reward": [], "loss": [], "grad_norm": [], "lr": [], "eval_step": [], "eval_reward": [],
            "eval_loss": [], "validation_step": [], "validation_reward": []}


@dataclass
class TrainingState:
    """What a resumed run continues from."""

    step: int = 0
    history: dict[str, list] = field(default_factory=new_history)
    config: dict = field(default_factory=dict)
    stop_reason: str = ""
    best_eval: float | None = None  # lowest held-out loss so far (the early-stopping criterion)
    evals_without_improvement: int = 0
    best_step: int | None = None  # step of that evaluation
    best_eval_reward: float | None = None  # held-out reward at that evaluation


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


def optimizer_tensors(named_params: Iterable[tuple[str, torch.Tensor]],
                      optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """`{name}.{state key}` for every tensor of the optimizer's per-parameter state (AdamW: exp_avg,
    exp_avg_sq, step) and `{name}.master` for the float32 weight itself; CPU copies."""
    tensors = {}
    for name, param in named_params:
        tensors[f"{name}.{MASTER_KEY}"] = param.detach().to("cpu", torch.float32, copy=True).contiguous()
        for key, value in optimizer.state.get(param, {}).items():
            value = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            tensors[f"{name}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
    return tensors


def _tensors_are_finite(tensors: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def save_training_state(layout: RunLayout, tensors: Mapping[str, torch.Tensor], step: int, run_id: str) -> Path | None:
    """Write the run's training_state.safetensors atomically. Non-finite state is never written:
    the file from an earlier save is removed instead (it would not match the LoRA that the same
    save writes) and None is returned."""
    target = layout.state
    if not _tensors_are_finite(tensors):
        log.warning("training state at step %d holds NaN/inf; not saved (a resume will restart AdamW's moments)",
                    step)
        target.unlink(missing_ok=True)
        return None
    metadata = {"format": STATE_FORMAT, STEP_KEY: str(step), RUN_ID_KEY: run_id, "lora_file": layout.lora.name}
    return save_safetensors_atomic(target, tensors, metadata=metadata)


def read_training_state(layout: RunLayout) -> tuple[dict[str, torch.Tensor], int, str | None] | None:
    """(tensors, step, run id) of the run's state file; None when there is none."""
    target = layout.state
    if not target.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(target), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a bad header
        raise ValueError(f"cannot read training state {target}: {e}. The file is corrupt or incomplete.") from e
    if metadata.get("format") != STATE_FORMAT or STEP_KEY not in metadata:
        raise ValueError(f"{target} is not a training state written by this trainer")
    return tensors, int(metadata[STEP_KEY]), metadata.get(RUN_ID_KEY)


def split_scaler_state(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(per-factor optimizer tensors, GradScaler tensors without the prefix)."""
    factors = {k: v for k, v in tensors.items() if not k.startswith(SCALER_PREFIX)}
    scaler = {k[len(SCALER_PREFIX):]: v for k, v in tensors.items() if k.startswith(SCALER_PREFIX)}
    return factors, scaler


def restore_optimizer_state(named_params: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
                            tensors: Mapping[str, torch.Tensor], lora: LoraWeights | None = None) -> str | None:
    """Load saved optimizer state (and float32 master weights) into `optimizer` / the parameters.

    Nothing is changed and the reason is returned when the state does not fit: another set of
    LoRA factors, other shapes, or master weights that do not round to the LoRA file's weights
    (the file was replaced after the save). `lora` is the loaded file, for that last check."""
    known = {name for name, _ in named_params}
    stored = {key.rsplit(".", 1)[0] for key in tensors}
    if stored != known:
        extra, lacking = sorted(stored - known)[:2], sorted(known - stored)[:2]
        return f"it holds other LoRA factors (file-only {extra}, run-only {lacking})"
    masters = {}
    for name, param in named_params:
        master = tensors.get(f"{name}.{MASTER_KEY}")
        if master is None or master.shape != param.shape:
            return f"{name}: the stored master weight is missing or has another shape"
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            value = tensors.get(f"{name}.{key}")
            if value is not None and value.shape != param.shape:
                return f"{name}.{key} has shape {tuple(value.shape)}, the LoRA factor {tuple(param.shape)}"
        if lora is not None:
            path, factor = name.rsplit(".", 1)
            saved = getattr(lora.modules[path], factor)
            if not torch.equal(master.to(saved.dtype), saved):
                return f"{name}: the LoRA file's weights are not those the optimizer state was saved with"
        masters[name] = master
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    state_dict = optimizer.state_dict()
    state_dict["state"] = {}
    for name, param in named_params:
        entries = {key.rsplit(".", 1)[1]: value for key, value in tensors.items()
                   if key.rsplit(".", 1)[0] == name and not key.endswith("." + MASTER_KEY)}
        if entries:
            state_dict["state"][index[id(param)]] = {k: v.clone() for k, v in entries.items()}
    optimizer.load_state_dict(state_dict)  # casts moments to each parameter's device and dtype
    with torch.no_grad():
        for name, param in named_params:
            param.copy_(masters[name])
    return None


def save_lora(path: str | os.PathLike, weights: LoraWeights, state: TrainingState, run_id: str,
              dtype: torch.dtype = torch.bfloat16, extra_metadata: Mapping[str, str] | None = None) -> Path:
    """The LoRA (official format) with the step, settings and run id in its metadata. Raises
    NonFiniteWeightsError, leaving any previous file untouched, when a weight is NaN or inf."""
    path = Path(path)
    if not weights_are_finite(weights):
        raise NonFiniteWeightsError(f"LoRA weights at step {state.step} hold NaN/inf; {path} was not overwritten")
    metadata = {STEP_KEY: str(state.step), CONFIG_KEY: json.dumps(_json_safe(state.config), sort_keys=True),
                RUN_ID_KEY: run_id}
    metadata.update(extra_metadata or {})
    save_lora_file(path, weights, dtype=dtype, metadata=metadata)
    return path


def save_numbered_checkpoint(layout: RunLayout, weights: LoraWeights, state: TrainingState, run_id: str,
                             dtype: torch.dtype = torch.bfloat16, total_limit: int = 0) -> Path:
    """The LoRA of this step as `checkpoints/<run>-stepNNNNNN.safetensors`; with a `total_limit`,
    the oldest numbered checkpoints of THIS run beyond it are removed (files of other runs or the
    user's are never touched: each is checked for this run's id)."""
    path = save_lora(layout.checkpoint(state.step), weights, state, run_id, dtype,
                     {"easyanimate_reward_checkpoint_of": layout.lora.name})
    if total_limit > 0:
        for old in numbered_checkpoints(layout, run_id)[:-total_limit]:
            old.unlink(missing_ok=True)
    return path


def numbered_checkpoints(layout: RunLayout, run_id: str) -> list[Path]:
    """This run's numbered checkpoints, oldest first."""
    if not layout.checkpoints.is_dir():
        return []
    prefix = layout.checkpoint(0).name.rsplit("-step", 1)[0] + "-step"
    found = [p for p in layout.checkpoints.glob(f"*{LORA_SUFFIX}") if p.name.startswith(prefix)]
    return sorted((p for p in found if file_run_id(p) == run_id), key=lambda p: p.name)


def run_record(layout: RunLayout, state: TrainingState, run_id: str, extra: dict | None = None) -> dict:
    record = {
        "format": RUN_FORMAT,
        "run_id": run_id,
        "lora_file": layout.lora.name,
        "step": state.step,
        "stop_reason": state.stop_reason,
        "best_eval": state.best_eval,
        "evals_without_improvement": state.evals_without_improvement,
        "best_step": state.best_step,
        "best_eval_reward": state.best_eval_reward,
        "config": state.config,
        "history": state.history,
    }
    record.update(extra or {})
    return record


def write_run_record(layout: RunLayout, record: dict) -> Path:
    return write_text_atomic(layout.run_json, json.dumps(_json_safe(record), indent=1, sort_keys=True))


def save_checkpoint(layout: RunLayout, weights: LoraWeights, state: TrainingState, run_id: str,
                    extra: dict | None = None, dtype: torch.dtype = torch.bfloat16,
                    optimizer_state: Mapping[str, torch.Tensor] | None = None) -> Path:
    """The LoRA, with `optimizer_state` (see optimizer_tensors) the state file, and run.json.
    Raises NonFiniteWeightsError, leaving every previous file untouched, when a weight is NaN/inf."""
    if not weights_are_finite(weights):
        raise NonFiniteWeightsError(f"LoRA weights at step {state.step} hold NaN/inf; "
                                    f"{layout.lora} was not overwritten")
    saved_state = None
    if optimizer_state is not None:
        # Written first: a crash before the LoRA leaves a step mismatch, which a resume detects.
        saved_state = save_training_state(layout, optimizer_state, state.step, run_id)
    save_lora(layout.lora, weights, state, run_id, dtype)
    record = run_record(layout, state, run_id, extra)
    record["training_state"] = (f"saved in {layout.state.name} (exact resume)" if saved_state is not None
                                else "not saved (AdamW moments restart on resume)")
    record["state_file"] = saved_state.name if saved_state is not None else None
    write_run_record(layout, record)
    return layout.lora


def _restore_nan(values: list) -> list:
    return [float("nan") if v is None else v for v in values]


def load_checkpoint(layout: RunLayout | str | os.PathLike, transformer) -> tuple[LoraWeights, TrainingState]:
    """The LoRA (checked against `transformer`) and the training state to resume from. A LoRA
    without a run record (any kohya/PEFT LoRA) resumes at step 0 with an empty history. A path is
    read with the CLI's default layout (RunLayout.for_lora_file)."""
    if not isinstance(layout, RunLayout):
        layout = RunLayout.for_lora_file(layout)
    weights = load_lora_file(layout.lora, transformer)
    file_step = weights.metadata.get(STEP_KEY)
    file_run = weights.metadata.get(RUN_ID_KEY)
    try:
        record = read_run_record(layout)
    except ValueError as e:
        log.warning("%s; resuming %s without its history", e, layout.lora)
        record = None
    if record is not None and file_run is not None and record.get("run_id") != file_run:
        log.warning("%s belongs to another run than %s; resuming without its history", layout.run_json, layout.lora)
        record = None
    state = TrainingState()
    if record is not None:
        state.step = int(record.get("step", 0))
        history = new_history()
        for key, values in (record.get("history") or {}).items():
            if key in history:
                history[key] = _restore_nan(list(values))
        state.history = history
        state.config = dict(record.get("config") or {})
        state.best_eval = record.get("best_eval")
        state.evals_without_improvement = int(record.get("evals_without_improvement") or 0)
        state.best_step = record.get("best_step")
        state.best_eval_reward = record.get("best_eval_reward")
    if file_step is not None and int(file_step) != state.step:
        # run.json belongs to another save (a crash between the two writes): trust the LoRA file.
        state.step = int(file_step)
        keep = [i for i, s in enumerate(state.history["step"]) if s <= state.step]
        for key in ("step", "reward", "loss", "grad_norm", "lr"):
            state.history[key] = [state.history[key][i] for i in keep if i < len(state.history[key])]
        kept = [i for i, s in enumerate(state.history["validation_step"]) if s <= state.step]
        for key in ("validation_step", "validation_reward"):
            state.history[key] = [state.history[key][i] for i in kept if i < len(state.history[key])]
        evals = [i for i, s in enumerate(state.history["eval_step"]) if s <= state.step]
        for key in ("eval_step", "eval_reward", "eval_loss"):
            state.history[key] = [state.history[key][i] for i in evals if i < len(state.history[key])]
        if state.best_step is not None and state.best_step > state.step:
            _best_from_history(state)
    return weights, state


def _best_from_history(state: TrainingState) -> None:
    """Recompute the best held-out evaluation from the (truncated) history."""
    history = state.history
    state.best_eval = state.best_step = state.best_eval_reward = None
    state.evals_without_improvement = 0
    for step, reward, loss in zip(history["eval_step"], history["eval_reward"], history["eval_loss"]):
        if loss is None or not math.isfinite(loss):
            continue
        if state.best_eval is None or loss < state.best_eval:
            state.best_eval, state.best_step, state.best_eval_reward = loss, step, reward
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
