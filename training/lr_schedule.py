"""The learning rate of every optimizer step: the official trainer's `scale_lr` and diffusers'
schedules (constant, linear or cosine decay, each after a linear warmup)."""

from __future__ import annotations

import warnings

import torch

# Our names -> diffusers.optimization.get_scheduler's (constant with a warmup is its own schedule there).
_DIFFUSERS_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def base_learning_rate(config, world_size: int = 1) -> float:
    """The configured learning rate, times the global batch when `scale_lr` is on (as the official
    --scale_lr: lr x grad_accumulation x batch_size x processes)."""
    lr = float(config.learning_rate)
    if config.scale_lr:
        lr *= config.grad_accumulation * config.batch_size * world_size
    return lr


def make_lr_scheduler(config, optimizer: torch.optim.Optimizer, done_steps: int = 0):
    """diffusers' scheduler for the config, advanced past `done_steps` optimizer steps (a resume
    continues the schedule where the run stopped; the rate is a function of the step alone)."""
    from diffusers.optimization import get_scheduler

    scheduler = get_scheduler(_DIFFUSERS_NAMES[config.lr_scheduler], optimizer,
                              num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.train_steps)
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended while fast-forwarding
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(done_steps):
            scheduler.step()
    return scheduler


def current_learning_rate(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
