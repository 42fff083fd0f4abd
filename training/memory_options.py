"""Training memory options: activation offload to the CPU and an 8-bit AdamW.

- activation offload: every tensor autograd saves for backward on the grad steps goes to (pinned)
  CPU memory and comes back during backward (torch.autograd.graph.save_on_cpu). The GPU then holds
  the weights, the LoRA and one step's working set; RAM holds the saved activations.
- "adamw_8bit": bitsandbytes' AdamW8bit (block-wise 8-bit moments: about 2 bytes per LoRA
  parameter instead of 8). Its state (uint8 moments, quantile maps, block maxima, step) is saved
  with the checkpoint like AdamW's, so a resume continues exactly.
"""

from __future__ import annotations

import contextlib

import torch

OPTIMIZERS = ("adamw", "adamw_8bit")


def activation_offload(config, device: torch.device | str):
    """The context the trainer runs its rollout and reward in: save_on_cpu when the config asks for
    activation offload and the compute device is not the CPU itself (there it would only copy)."""
    device = torch.device(device)
    if not getattr(config, "activation_offload", False) or device.type == "cpu":
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


def check_optimizer_name(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def make_optimizer(config, params, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW (torch) or AdamW8bit (bitsandbytes) with the config's betas, weight decay and eps, at
    `lr` (default: the config's learning rate; the trainer passes it scaled, see lr_schedule.py)."""
    name = getattr(config, "optimizer", "adamw")
    check_optimizer_name(name)
    params = list(params)
    kwargs = dict(lr=config.learning_rate if lr is None else lr, weight_decay=config.weight_decay,
                  eps=config.adam_eps, betas=(config.adam_beta1, config.adam_beta2))
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a broken native library
        raise RuntimeError(f"optimizer 'adamw_8bit' needs bitsandbytes, which cannot be imported here "
                           f"({type(e).__name__}: {e}). Install it with `pip install bitsandbytes`, or choose "
                           "optimizer 'adamw'.") from None
    device = params[0].device if params else torch.device("cpu")
    _probe_8bit(bnb, device)
    return bnb.optim.AdamW8bit(params, **kwargs)


def _probe_8bit(bnb, device: torch.device) -> None:
    """One 8-bit update on a throw-away tensor of the training device: a device bitsandbytes has
    no kernels for fails here, with a message, not in the middle of the first training step."""
    try:
        probe = torch.nn.Parameter(torch.zeros(4096, device=device))
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    except Exception as e:  # noqa: BLE001 - bitsandbytes raises many kinds here
        raise RuntimeError(f"optimizer 'adamw_8bit': bitsandbytes {getattr(bnb, '__version__', '')} cannot run on "
                           f"{device.type} ({type(e).__name__}: {str(e)[:300]}). Choose optimizer 'adamw'.") from None


def after_restore(optimizer: torch.optim.Optimizer) -> None:
    """bitsandbytes keeps its step counter as a Python int; a checkpoint stores it as a tensor."""
    if type(optimizer).__module__.startswith("bitsandbytes"):
        for state in optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = int(step.item())
