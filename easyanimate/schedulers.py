"""Schedulers a user can pick, built from the model folder's own scheduler config, and the check
that a scheduler can really run the requested number of steps.

Flow-matching (V5.1) models get diffusers' multistep solvers in flow mode besides the plain Euler
flow sampler: `UniPCMultistepScheduler` and `DPMSolverMultistepScheduler` with
`prediction_type="flow_prediction"`, `use_flow_sigmas=True` and a `flow_shift` (VideoX-Fun calls
them "Flow_Unipc" / "Flow_DPM++"). Second-order multistep solvers reach a given accuracy in fewer
steps than Euler, which is what makes 20-30 steps enough.

`shift` (flow models only): 0 keeps the folder's own schedule (its `shift`, or, with
`use_dynamic_shifting`, the exp(mu) with mu = 1 that EasyAnimate's pipelines pass), so the three
flow samplers walk the same noise levels by default; a value > 0 replaces it for all three.
"""

from __future__ import annotations

import math

import torch

# Scheduler names a user can pick. Noise-prediction (V5, DDIM-trained) models take any of the
# first five; flow-matching (V5.1) models the flow ones.
NOISE_SCHEDULERS = {
    "DDIM": "DDIMScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler A": "EulerAncestralDiscreteScheduler",
    "DPM++": "DPMSolverMultistepScheduler",
    "PNDM": "PNDMScheduler",
}
FLOW_SCHEDULERS = {
    "Flow": "FlowMatchEulerDiscreteScheduler",
    "Flow UniPC": "UniPCMultistepScheduler",
    "Flow DPM++": "DPMSolverMultistepScheduler",
}
SCHEDULER_CHOICES = ("auto",) + tuple(NOISE_SCHEDULERS) + tuple(FLOW_SCHEDULERS)
MAX_SHIFT = 100.0
PNDM_MIN_STEPS = 4  # its Runge-Kutta warm-up needs the last 4 timesteps (diffusers: pndm_order)


def folder_shift(config: dict) -> float:
    """The shift the folder's own flow schedule uses (see the module docstring)."""
    if config.get("use_dynamic_shifting", False):
        mu = 1.0  # what EasyAnimate's pipelines pass to set_timesteps
        return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu
    return float(config.get("shift", 1.0))


def check_shift(shift: float, flow: bool) -> None:
    if not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift < 0 or shift > MAX_SHIFT:
        raise ValueError(f"shift must be 0 (the model folder's own) or a number in (0, {MAX_SHIFT:g}]; got {shift!r}")
    if shift and not flow:
        raise ValueError("shift applies to flow-matching (V5.1) models only; set it to 0 for this "
                         "noise-prediction (V5) model")


def build_scheduler(class_name: str, config: dict, flow: bool, shift: float = 0.0):
    """A fresh scheduler of `class_name` (diffusers) from the folder's `config`."""
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise ValueError(f"{class_name!r} is not a diffusers scheduler class")
    if not flow:
        return cls.from_config(config)
    chosen = float(shift) if shift else folder_shift(config)
    if class_name == "FlowMatchEulerDiscreteScheduler" and shift:
        return cls.from_config(config, shift=chosen, use_dynamic_shifting=False)
    if class_name in ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler"):
        flow_config = {"num_train_timesteps": config.get("num_train_timesteps", 1000)}
        return cls.from_config(flow_config, prediction_type="flow_prediction", use_flow_sigmas=True,
                               flow_shift=chosen)
    return cls.from_config(config)


def _set(scheduler, steps: int, device) -> None:
    if getattr(scheduler.config, "use_dynamic_shifting", False):
        scheduler.set_timesteps(steps, device=device, mu=1)  # what EasyAnimate's pipelines pass
    else:
        scheduler.set_timesteps(steps, device=device)


_CHECKED: dict[tuple, str | None] = {}


def _dry_run(scheduler, steps: int) -> str | None:
    """Run the scheduler's whole loop on a 1-pixel latent with a made-up prediction; return why it
    cannot do `steps` steps (an exception, non-finite values, a repeated timestep), or None."""
    probe = type(scheduler).from_config(scheduler.config)
    try:
        _set(probe, steps, "cpu")
        timesteps = probe.timesteps
        if len(torch.unique(timesteps)) < len(timesteps) and not type(probe).__name__.startswith("PNDM"):
            return "its timesteps repeat (more steps than the schedule has distinct noise levels)"
        gen = torch.Generator("cpu").manual_seed(0)
        x = torch.randn((1, 1, 1, 1, 1), generator=gen) * getattr(probe, "init_noise_sigma", 1.0)
        kwargs = {"generator": gen} if "generator" in _step_parameters(probe) else {}
        for t in timesteps:
            if hasattr(probe, "scale_model_input"):
                probe.scale_model_input(x, t)
            x = probe.step(0.1 * torch.randn(x.shape, generator=gen), t, x, return_dict=False, **kwargs)[0]
        if not torch.isfinite(x).all():
            return "its update gives non-finite values"
    except Exception as e:  # noqa: BLE001 - any failure of the library's scheduler means "cannot"
        return f"{type(e).__name__}: {e}"
    return None


def _step_parameters(scheduler) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


def check_steps(scheduler, steps: int, name: str | None = None) -> None:
    """Refuse a step count the scheduler cannot run, with the reason and what it can do."""
    label = name or type(scheduler).__name__
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a whole number of at least 1; got {steps!r}")
    is_pndm = type(scheduler).__name__ == "PNDMScheduler"
    if is_pndm and not scheduler.config.get("skip_prk_steps", False) and steps < PNDM_MIN_STEPS:
        raise ValueError(f"scheduler {label} needs at least {PNDM_MIN_STEPS} steps (its Runge-Kutta warm-up uses "
                         f"the last {PNDM_MIN_STEPS} timesteps); got {steps}. Use {PNDM_MIN_STEPS} or more steps, "
                         f"or another scheduler for 1-{PNDM_MIN_STEPS - 1} steps")
    key = (type(scheduler).__name__, repr(sorted(dict(scheduler.config).items())), steps)
    if key not in _CHECKED:
        if len(_CHECKED) > 512:
            _CHECKED.clear()
        _CHECKED[key] = _dry_run(scheduler, steps)
    reason = _CHECKED[key]
    if reason is not None:
        train = scheduler.config.get("num_train_timesteps", 1000)
        raise ValueError(f"scheduler {label} cannot run {steps} steps with this model's schedule "
                         f"({train} training timesteps): {reason}. Use fewer steps (every scheduler here runs "
                         f"1-200 steps; PNDM from {PNDM_MIN_STEPS})")
